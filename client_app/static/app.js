// Encore feedback page: look up a user's playlists, like them. Each list shown is reported
// once as a view, so that likes can be set against what was shown.
// Plain script, no build step, no dependencies. Text from the server is only ever put into
// the page with textContent, never parsed as HTML.
"use strict";

(() => {
  const MAX_ID = 9223372036854775807n; // ids are non-negative 64-bit integers
  // The most playlists a list may show: the served run's top-n, learnt from /v1/model at load.
  // Unknown (the service unreachable then), only the lower bound is checked here and the
  // server's answer says the rest.
  let maxCount = null;
  const REQUEST_TIMEOUT_MS = 10000;
  // Automatic retries of a feedback event (a like or a view) after a network error or a
  // 502/503/504; a like then offers a Retry button, a view is given up.
  const RETRY_DELAYS_MS = [500, 1000, 2000];
  const RETRY_STATUSES = new Set([502, 503, 504]);

  const $ = (id) => document.getElementById(id);
  const form = $("lookup");
  const userInput = $("user-id");
  const countInput = $("count");
  const statusLine = $("status");
  const problemLine = $("problem");
  const results = $("results");
  const resultsTitle = $("results-title");
  const sourceBadge = $("source");
  const sourceNote = $("source-note");
  const list = $("playlists");
  const runInfo = $("run-info");
  const chosenBy = $("chosen-by");
  const chosenByVersion = $("chosen-by-version");

  let lookupGeneration = 0;

  // ---- messages -------------------------------------------------------------------------

  function announce(text) {
    problemLine.textContent = "";
    statusLine.textContent = text;
  }

  function complain(text) {
    statusLine.textContent = "";
    problemLine.textContent = text;
  }

  function clearMessages() {
    statusLine.textContent = "";
    problemLine.textContent = "";
  }

  function showFieldError(input, errorElement, message) {
    input.setAttribute("aria-invalid", "true");
    errorElement.textContent = message;
    errorElement.hidden = false;
  }

  function clearFieldError(input, errorElement) {
    input.removeAttribute("aria-invalid");
    errorElement.textContent = "";
    errorElement.hidden = true;
  }

  // ---- validation -----------------------------------------------------------------------

  // Ids stay decimal strings end to end: a JavaScript number cannot hold every 64-bit id.
  function parseUserId(raw) {
    const text = raw.trim();
    if (text === "") return { error: "Enter a user id." };
    if (!/^\d+$/.test(text)) {
      return { error: "A user id is a whole number, 0 or more, with digits only (for example 42)." };
    }
    const value = BigInt(text);
    if (value > MAX_ID) {
      return { error: `That is larger than any user id (the largest is ${MAX_ID}).` };
    }
    return { value: value.toString() };
  }

  function parseCount(raw) {
    const text = raw.trim();
    if (text === "") return { value: null };
    const tooMany = maxCount !== null && Number(text) > maxCount;
    if (!/^\d+$/.test(text) || Number(text) < 1 || tooMany) {
      const range = maxCount === null ? "of 1 or more" : `from 1 to ${maxCount}`;
      return { error: `Enter a whole number ${range}, or leave it empty.` };
    }
    return { value: String(Number(text)) };
  }

  // ---- HTTP -----------------------------------------------------------------------------

  async function request(url, options = {}) {
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), REQUEST_TIMEOUT_MS);
    try {
      return await fetch(url, {
        ...options,
        headers: { Accept: "application/json", ...(options.headers || {}) },
        signal: controller.signal,
        cache: "no-store",
      });
    } finally {
      clearTimeout(timer);
    }
  }

  // Integers of 16 or more digits outside strings become strings before JSON.parse, so a
  // 64-bit id is not rounded to the nearest double.
  const BIG_INTEGER = /"(?:[^"\\]|\\.)*"|(?<![\w.+-])\d{16,}(?![\w.])/g;

  function parseJson(text) {
    return JSON.parse(text.replace(BIG_INTEGER, (m) => (m[0] === '"' ? m : `"${m}"`)));
  }

  async function readJson(response) {
    try {
      return parseJson(await response.text());
    } catch {
      return null;
    }
  }

  function asId(value) {
    if (typeof value === "string" && /^\d+$/.test(value)) return value;
    if (Number.isSafeInteger(value) && value >= 0) return String(value);
    throw new Error(`not an id: ${value}`);
  }

  function detailOf(body, response) {
    const detail = body && body.detail;
    if (typeof detail === "string" && detail) return detail;
    if (Array.isArray(detail) && detail.length) {
      // FastAPI's validation errors: [{loc: [...], msg: "..."}]
      return detail
        .map((d) => {
          const where = Array.isArray(d.loc) ? d.loc.filter((p) => p !== "body").join(".") : "";
          return where ? `${where}: ${d.msg}` : String(d.msg);
        })
        .join("; ");
    }
    return `HTTP ${response.status}${response.statusText ? " " + response.statusText : ""}`;
  }

  class HttpProblem extends Error {}

  async function getJson(url, what) {
    let response;
    try {
      response = await request(url);
    } catch {
      throw new HttpProblem(`Could not reach the server to load ${what}. Check the connection and try again.`);
    }
    const body = await readJson(response);
    if (!response.ok) {
      const detail = detailOf(body, response);
      if (response.status === 503) {
        throw new HttpProblem(`The service is unavailable right now, so ${what} could not be loaded (${detail}). Try again in a moment.`);
      }
      if (response.status >= 500) {
        throw new HttpProblem(`The server failed to load ${what} (${detail}).`);
      }
      throw new HttpProblem(`The server refused the request: ${detail}`);
    }
    if (body === null) throw new HttpProblem(`The server sent an unreadable answer for ${what}.`);
    return body;
  }

  function newEventId() {
    if (crypto.randomUUID) return crypto.randomUUID();
    // randomUUID needs a secure context (https or localhost); getRandomValues does not.
    const b = crypto.getRandomValues(new Uint8Array(16));
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
    return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  // ---- looking up a user ----------------------------------------------------------------

  async function learnMaxCount() {
    try {
      const model = await getJson("/v1/model", "the served model");
      if (Number.isInteger(model.top_n) && model.top_n >= 1) {
        maxCount = model.top_n;
        $("count-hint").textContent = `Between 1 and ${maxCount}.`;
      }
    } catch {
      // Nothing published yet, or the service is away: a lookup will say so.
    }
  }
  learnMaxCount();

  userInput.addEventListener("input", () => clearFieldError(userInput, $("user-id-error")));
  countInput.addEventListener("input", () => clearFieldError(countInput, $("count-error")));

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearMessages();
    const user = parseUserId(userInput.value);
    const count = parseCount(countInput.value);
    clearFieldError(userInput, $("user-id-error"));
    clearFieldError(countInput, $("count-error"));
    if (user.error) showFieldError(userInput, $("user-id-error"), user.error);
    if (count.error) showFieldError(countInput, $("count-error"), count.error);
    if (user.error || count.error) {
      (user.error ? userInput : countInput).focus();
      return;
    }

    const generation = ++lookupGeneration;
    results.hidden = true;
    announce(`Loading playlists for user ${user.value}…`);
    try {
      const query = count.value === null ? "" : `?n=${count.value}`;
      const recs = await getJson(
        `/v1/recommendations/${encodeURIComponent(user.value)}${query}`, "the playlists"
      );
      const ids = (recs.playlist_ids || []).map(asId);
      let names = new Map();
      let namesMissing = false;
      if (ids.length) {
        try {
          const found = await getJson(`/v1/playlists?ids=${ids.join(",")}`, "playlist names");
          names = new Map(found.playlists.map((p) => [asId(p.playlist_id), p.name]));
        } catch {
          namesMissing = true; // the list is still useful without names
        }
      }
      if (generation !== lookupGeneration) return; // a newer lookup has started
      render(user.value, recs, ids, names);
      let message = ids.length
        ? `Showing ${ids.length} ${ids.length === 1 ? "playlist" : "playlists"} for user ${user.value}.`
        : `There are no playlists to show for user ${user.value}.`;
      if (namesMissing) message += " Playlist names could not be loaded, so ids are shown.";
      announce(message);
    } catch (err) {
      if (generation !== lookupGeneration) return;
      complain(err instanceof HttpProblem ? err.message : `Something went wrong: ${err.message}`);
    }
  });

  function displayName(id, name) {
    return typeof name === "string" && name.trim() !== "" ? name : `Playlist ${id}`;
  }

  function render(userId, recs, ids, names) {
    const personal = recs.source === "batch";
    resultsTitle.textContent = `Playlists for user ${userId}`;
    sourceBadge.textContent = personal ? "Personal picks" : "Popular picks";
    sourceBadge.className = personal ? "badge badge-personal" : "badge badge-popular";
    sourceNote.textContent = personal
      ? "Chosen for this user by the latest nightly run."
      : "There is no personal list for this user yet, so these are the most popular playlists.";

    // One user's answer is that user's element: its model_version is the version that chose
    // this list (a challenger's, for a user in an experiment's other arm).
    chosenBy.hidden = typeof recs.model_version !== "string" || recs.model_version === "";
    chosenByVersion.textContent = chosenBy.hidden ? "" : recs.model_version;

    const shown = ids.slice();
    const context = { userId, runId: String(recs.run_id), shown };
    list.replaceChildren(
      ...ids.map((id, index) => playlistItem(context, id, displayName(id, names.get(id)), index))
    );
    $("run-id").textContent = String(recs.run_id);
    $("model-version").textContent = String(recs.model_version);
    runInfo.hidden = false;
    results.hidden = false;
    if (shown.length) sendView(context);
  }

  // ---- the view of a list ---------------------------------------------------------------

  // Every list shown, a new lookup of the same user included, is one view with its own event
  // id. It is sent in the background and never reported on the page: the list and its likes
  // do not depend on it, and a lost view only costs the experiment one impression.
  function sendView(context) {
    const eventId = newEventId();
    const body =
      `{"event_id":${JSON.stringify(eventId)},"kind":"view",` +
      `"user_id":${context.userId},` +
      `"run_id":${JSON.stringify(context.runId)},` +
      `"shown_playlist_ids":[${context.shown.join(",")}]}`;
    postFeedback(body).catch(() => {});
  }

  // ---- one playlist and its like --------------------------------------------------------

  function playlistItem(context, playlistId, name, index) {
    const item = document.createElement("li");
    item.className = "playlist";
    item.dataset.playlistId = playlistId;

    const rank = document.createElement("span");
    rank.className = "rank";
    rank.setAttribute("aria-hidden", "true");
    rank.textContent = String(index + 1);

    const text = document.createElement("div");
    text.className = "playlist-text";
    const title = document.createElement("span");
    title.className = "playlist-name";
    title.textContent = name;
    const idLine = document.createElement("span");
    idLine.className = "playlist-id";
    idLine.textContent = `#${playlistId}`;
    text.append(title, idLine);

    const button = document.createElement("button");
    button.type = "button";
    button.className = "like";
    const verb = document.createElement("span");
    const hiddenName = document.createElement("span");
    hiddenName.className = "visually-hidden";
    hiddenName.textContent = ` ${name}`;
    button.append(verb, hiddenName);

    const like = { context, playlistId, name, item, button, verb, eventId: null, state: "idle" };
    setLikeState(like, "idle");
    button.addEventListener("click", () => sendLike(like));

    item.append(rank, text, button);
    return item;
  }

  // The button keeps its identity (and so keyboard focus) through every state; while busy or
  // done it is aria-disabled rather than disabled, which would drop focus to the page.
  function setLikeState(like, state) {
    like.state = state;
    const { button, verb, item } = like;
    const labels = { idle: "Like", sending: "Saving…", liked: "Liked", failed: "Retry" };
    verb.textContent = labels[state];
    button.classList.toggle("retry", state === "failed");
    if (state === "sending" || state === "liked") button.setAttribute("aria-disabled", "true");
    else button.removeAttribute("aria-disabled");
    button.setAttribute("aria-pressed", state === "liked" ? "true" : "false");
    item.classList.toggle("is-liked", state === "liked");
    item.classList.toggle("is-failed", state === "failed");
  }

  function feedbackBody(like) {
    // Built by hand so that 64-bit ids (decimal strings here) go out exactly as JSON numbers.
    return (
      `{"event_id":${JSON.stringify(like.eventId)},` +
      `"user_id":${like.context.userId},` +
      `"run_id":${JSON.stringify(like.context.runId)},` +
      `"liked_playlist_id":${like.playlistId},` +
      `"shown_playlist_ids":[${like.context.shown.join(",")}]}`
    );
  }

  // POSTs one feedback event, retrying network errors and 502/503/504 with the same body, so
  // the same event id: the server stores the event once however many attempts reach it.
  // Resolves to the last response, or null when the server could not be reached at all.
  async function postFeedback(body, onRetry = () => {}) {
    for (let attempt = 0; ; attempt += 1) {
      let response = null;
      try {
        response = await request("/v1/feedback", {
          method: "POST",
          headers: { "Content-Type": "application/json" },
          body,
        });
      } catch {
        response = null; // network error or timeout: the server may or may not have it
      }
      if (response && (response.status === 201 || response.status === 200)) return response;
      const retryable = response === null || RETRY_STATUSES.has(response.status);
      if (!retryable || attempt >= RETRY_DELAYS_MS.length) return response;
      onRetry();
      const delay = RETRY_DELAYS_MS[attempt];
      await sleep(delay * (0.8 + 0.4 * Math.random()));
    }
  }

  async function sendLike(like) {
    if (like.state === "sending" || like.state === "liked") return;
    // One event id per like: every automatic retry and every press of Retry reuses it.
    if (like.eventId === null) like.eventId = newEventId();
    setLikeState(like, "sending");
    const response = await postFeedback(feedbackBody(like), () =>
      announce(`Saving your like of “${like.name}” is taking longer than usual; retrying…`)
    );
    if (response && (response.status === 201 || response.status === 200)) {
      setLikeState(like, "liked");
      announce(`Saved: you liked “${like.name}”.`);
      return;
    }
    if (response === null) {
      setLikeState(like, "failed");
      complain(`Your like of “${like.name}” was not saved: the server could not be reached. Press Retry to try again.`);
      return;
    }
    const detail = detailOf(await readJson(response), response);
    if (response.status >= 500) {
      setLikeState(like, "failed");
      const why = response.status === 503 ? "the service is unavailable" : "the server failed";
      complain(`Your like of “${like.name}” was not saved: ${why} (${detail}). Press Retry to try again.`);
      return;
    }
    // 4xx: sending the same event again would be refused again.
    like.eventId = null;
    setLikeState(like, "idle");
    complain(`Your like of “${like.name}” was refused: ${detail}`);
  }
})();
