"""Prometheus metric names, shared by the processes that export them and the dashboards.

Every name measures what it says. The model server's objects live in ``model_server.api_metrics``
on prometheus_client's default registry (where the instrumentator puts its own); the
scheduler's are created by ``scheduler.run_metrics.RunMetrics`` on a registry it owns.

Model server (besides prometheus-fastapi-instrumentator's ``http_requests_total`` and
``http_request_duration_seconds`` with labels handler, method, status):

=======================================  =========  ==========================================
encore_users_served_total                counter    users answered, label source=batch|fallback
encore_cold_users_total                  counter    users asked for that the run does not know
encore_store_read_seconds                histogram  online-store read latency, label operation
encore_feedback_events_total             counter    label outcome=stored|duplicate|failed
encore_feedback_likes_total              counter    likes, label model_version
encore_feedback_impressions_total        counter    playlists shown with a like, model_version
encore_feedback_views_total              counter    lists shown (view events), model_version
encore_experiment_like_rate              gauge      the running experiment's like rate, labels
                                                    experiment_id, model_version, role, bound
                                                    (estimate|low|high: the 95 % interval)
encore_experiment_users_viewed           gauge      users shown a list, per version
encore_experiment_like_rate_difference   gauge      challenger - champion, label bound
encore_experiment_p_value                gauge      two-proportion test's p-value
encore_current_run_age_seconds           gauge      age of the served run
encore_serving_run_info                  info       run_id, model_version of the served run
encore_run_refresh_failures_total        counter    failed reads of the current run (the last
                                                    known run was served meanwhile)
=======================================  =========  ==========================================

Scheduler (its own port) and run records:

=======================================  =========  ==========================================
encore_run_last_success_timestamp_seconds gauge     finish time of the last published run
encore_run_duration_seconds              gauge      duration of the last published run
encore_run_phase_seconds                 gauge      its phases, label phase=ingest|refresh|
                                                    score|publish
encore_ingest_rows                       gauge      interaction rows admitted so far
encore_ingest_partitions_set_aside       gauge      partitions set aside for a bad row
encore_retrain_refused                   gauge      1: the last retrained ranker failed the gate
encore_retrain_recall_at_10              gauge      recall@10 at that gate, label role=
                                                    champion|challenger
encore_run_users_scored                  gauge      users written by the last published run
encore_run_cold_users                    gauge      users without candidates (popular lists)
encore_run_cold_fraction                 gauge      cold users / users in that run
encore_run_drift_score                   gauge      PSI of popularity deciles vs the run before
encore_run_drift_chi2_pvalue             gauge      chi-square p-value of the same comparison
encore_batch_duration_seconds            histogram  score + write time of one batch
encore_recommended_popularity_decile     histogram  decile (1 = most popular) of each
                                                    recommended playlist, buckets 1..10
encore_run_failures_total                counter    label reason
encore_run_lock_contention_total         counter    runs refused because another held the lock
encore_runs_total                        counter    labels kind, status
encore_runs_queued                       gauge      runs queued through the API, not yet claimed
encore_runs_queued_oldest_timestamp_seconds gauge   when the oldest of them was queued
=======================================  =========  ==========================================
"""

from __future__ import annotations

USERS_SERVED = "encore_users_served_total"
COLD_USERS = "encore_cold_users_total"
STORE_READ_SECONDS = "encore_store_read_seconds"
FEEDBACK_EVENTS = "encore_feedback_events_total"
FEEDBACK_LIKES = "encore_feedback_likes_total"
FEEDBACK_IMPRESSIONS = "encore_feedback_impressions_total"
FEEDBACK_VIEWS = "encore_feedback_views_total"
EXPERIMENT_LIKE_RATE = "encore_experiment_like_rate"
EXPERIMENT_USERS_VIEWED = "encore_experiment_users_viewed"
EXPERIMENT_DIFFERENCE = "encore_experiment_like_rate_difference"
EXPERIMENT_P_VALUE = "encore_experiment_p_value"
CURRENT_RUN_AGE = "encore_current_run_age_seconds"
SERVING_RUN = "encore_serving_run"
RUN_REFRESH_FAILURES = "encore_run_refresh_failures_total"

RUN_LAST_SUCCESS = "encore_run_last_success_timestamp_seconds"
RUN_DURATION = "encore_run_duration_seconds"
RUN_PHASE_SECONDS = "encore_run_phase_seconds"
INGEST_SET_ASIDE = "encore_ingest_partitions_set_aside"
INGEST_ROWS = "encore_ingest_rows"
RETRAIN_REFUSED = "encore_retrain_refused"
RETRAIN_RECALL = "encore_retrain_recall_at_10"
RUN_USERS_SCORED = "encore_run_users_scored"
RUN_COLD_USERS = "encore_run_cold_users"
RUN_COLD_FRACTION = "encore_run_cold_fraction"
RUN_DRIFT_SCORE = "encore_run_drift_score"
RUN_DRIFT_PVALUE = "encore_run_drift_chi2_pvalue"
BATCH_SECONDS = "encore_batch_duration_seconds"
POPULARITY_DECILE = "encore_recommended_popularity_decile"
RUN_FAILURES = "encore_run_failures_total"
LOCK_CONTENTION = "encore_run_lock_contention_total"
RUNS = "encore_runs_total"
RUNS_QUEUED = "encore_runs_queued"
RUNS_QUEUED_OLDEST = "encore_runs_queued_oldest_timestamp_seconds"

# Sub-millisecond store reads up to multi-second stalls.
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
BATCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
DECILE_BUCKETS = tuple(float(d) for d in range(1, 11))
