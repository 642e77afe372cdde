"""The ``program`` model kind: a torch.export program imported like a trained bundle ranks
exactly as the built-in ranker it was exported from, and a program that would fail at 2 a.m.
is refused at import, with nothing written."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import pickle
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from encore.bundle import Bundle, open_bundle, promote
from encore.database import open_database
from encore.errors import BundleError
from encore.online import open_online_store
from encore.settings import Settings
from inference import load_model
from inference.importing import import_program
from inference.ranker import load_ranker
from scheduler.job import run_full
from tests.support import publish_random_run, train_small_bundle
from training.pairing import Pairings

USERS = 300


def _example_script():
    path = Path(__file__).resolve().parents[1] / "docs" / "examples" / "export_ranker.py"
    spec = importlib.util.spec_from_file_location("export_ranker", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EXAMPLE = _example_script()
example_inputs, export = EXAMPLE.example_inputs, EXAMPLE.export


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return train_small_bundle(tmp_path_factory.mktemp("program"))


@pytest.fixture(scope="module")
def exported(trained: Bundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained bundle's ranker, exported as the example script exports it."""
    path = tmp_path_factory.mktemp("exported") / "ranker.pt2"
    ranker = load_ranker(trained)
    torch.export.save(export(ranker, ranker.candidates), path)
    return path


@pytest.fixture
def bundles_dir(trained: Bundle, tmp_path: Path) -> Path:
    """A private bundles dir holding only the trained bundle."""
    copy = tmp_path / "home" / "bundles"
    shutil.copytree(trained.path, copy / trained.version)
    return copy


def _same_lists(a, b) -> None:
    assert np.array_equal(a.user_ids, b.user_ids)
    assert np.array_equal(a.playlist_ids, b.playlist_ids)
    assert a.payloads == b.payloads
    assert np.array_equal(a.cold_user_ids, b.cold_user_ids)
    assert np.array_equal(a.deciles, b.deciles)


def test_the_exported_ranker_lists_exactly_what_the_ranker_lists(
    trained: Bundle, exported: Path, bundles_dir: Path
) -> None:
    imported = import_program(bundles_dir, exported, like=trained.version, version="exported")
    model = imported.metadata["model"]
    assert model["kind"] == "program" and model["like"] == trained.version
    assert model["candidates"] == trained.metadata["model"]["candidates"]
    assert imported.metadata["metrics"] == {}
    assert imported.metadata["data"] == trained.metadata["data"]
    assert "data_fingerprint" not in imported.metadata  # `encore evaluate` writes elsewhere
    shared = imported.path / "pairings" / "indptr.npy"
    assert os.path.samefile(shared, bundles_dir / trained.version / "pairings" / "indptr.npy")

    builtin = load_model(open_bundle(bundles_dir, trained.version), top_n=10)
    program = load_model(open_bundle(bundles_dir, "exported"), top_n=10)
    users = len(trained.user_ids())
    whole = program.score(range(users))
    _same_lists(whole, builtin.score(range(users)))
    assert len(whole.user_ids) > users // 2
    codes = np.random.default_rng(1).permutation(users)[:300]
    _same_lists(program.score(codes), builtin.score(codes))
    _same_lists(program.score(range(5, 6)), builtin.score(range(5, 6)))  # a batch of one
    assert program.score(np.array([], dtype=np.int64)).payloads == []


def test_the_program_loads_without_unpickling_anything(
    trained: Bundle, exported: Path, bundles_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import_program(bundles_dir, exported, like=trained.version, version="exported")
    expected = load_model(bundles_dir / "exported", top_n=10).score(range(200))

    def refused(*args, **kwargs):
        raise AssertionError("unpickled")

    for target, name in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(target, name, refused)
    _same_lists(load_model(bundles_dir / "exported", top_n=10).score(range(200)), expected)
    with pytest.raises(AssertionError, match="unpickled"):  # the patch does bite
        load_model(bundles_dir / trained.version, top_n=10)


def test_the_cli_imports_a_program_and_lists_it(
    trained: Bundle,
    exported: Path,
    bundles_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    outcomes = _cli(monkeypatch, capsys, "models", "import", "--program", str(exported),
                    "--like", trained.version, "--version", "team-ranker")  # fmt: skip
    assert outcomes == (0, "imported team-ranker")
    code, listing = _cli(monkeypatch, capsys, "models", "list")
    assert code == 0 and "team-ranker" in listing and trained.version in listing
    code, message = _cli(monkeypatch, capsys, "models", "import", "--program",
                         str(bundles_dir / trained.version / "weights.pt"), "--like",
                         trained.version)  # fmt: skip
    assert code == 1
    assert message.startswith("error: ") and "weights.pt is not a torch.export program" in message
    assert sorted(p.name for p in bundles_dir.iterdir()) == [trained.version, "team-ranker"]


def _cli(monkeypatch, capsys, *argv: str) -> tuple[int, str]:
    """``encore *argv`` in this process, through main() and its error handling."""
    import encore.cli

    monkeypatch.setattr(encore.cli, "configure_logging", lambda: None)
    monkeypatch.setattr(sys, "argv", ["encore", *argv])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        encore.cli.main()
    captured = capsys.readouterr()
    return exit_.value.code or 0, " ".join((captured.out + captured.err).split())


# --------------------------------------------------------------------------------------
# Refusals: each names what was expected and what was found, and writes nothing
# --------------------------------------------------------------------------------------


class ThreeInputs(nn.Module):
    def forward(self, users, items, support):
        return support * 2


class BatchScores(nn.Module):
    def forward(self, users, items, support, neighbours, mask):
        return support.sum(dim=1)


class OneSlotTooMany(nn.Module):
    def forward(self, users, items, support, neighbours, mask):
        return torch.cat([support, support[:, :1]], dim=1)


class IntegerScores(nn.Module):
    def forward(self, users, items, support, neighbours, mask):
        return items * 2


class InfiniteScores(nn.Module):
    def forward(self, users, items, support, neighbours, mask):
        return support / torch.zeros_like(support)


class BySupport(nn.Module):  # the signature before item_score joined it
    def forward(self, users, items, support, neighbours, mask):
        return support


class ByItemScore(nn.Module):
    def forward(self, users, items, support, neighbours, mask, item_score):
        return item_score


def test_programs_of_five_and_of_six_inputs_both_score(
    trained: Bundle, bundles_dir: Path, tmp_path: Path
) -> None:
    """item_score joined the signature with the item-item generator; a program exported
    before it (five inputs) still imports and scores."""
    candidates = trained.metadata["model"]["candidates"]
    pairs = Pairings.load(trained.pairings_dir)
    users = np.flatnonzero(np.diff(pairs.indptr) > 0)[:50]
    for module, inputs, column in ((BySupport(), 5, "support"), (ByItemScore(), 6, "item_score")):
        path = tmp_path / f"{column}.pt2"
        _export(module, path, candidates, inputs=inputs)
        import_program(bundles_dir, path, like=trained.version, version=column)
        scored = load_model(open_bundle(bundles_dir, column), top_n=1).score(users)
        values = getattr(pairs, column)
        ids = trained.playlist_ids()
        for user, top in zip(users, scored.playlist_ids[:, 0], strict=True):
            span = slice(pairs.indptr[user], pairs.indptr[user + 1])
            best = pairs.items[span][np.argmax(values[span])]
            assert top == ids[best], (column, user)


def _export(module: nn.Module, path: Path, candidates: int, *, inputs: int = 5, dynamic=None):
    batch = torch.export.Dim("batch") if dynamic is None else dynamic
    shapes = tuple({0: batch} for _ in range(inputs)) if batch is not False else None
    args = example_inputs(4, candidates)[:inputs]
    torch.export.save(torch.export.export(module, args, dynamic_shapes=shapes), path)


REFUSALS = {
    "three inputs": (
        lambda path, c: _export(ThreeInputs(), path, c, inputs=3),
        r"takes \(users int64 \(B,\), items int64 \(B, {c}\), support float32 \(B, {c}\)\); "
        r"a program must take \(users int64 \(B,\), items int64 \(B, C\), .*C = {c}",
    ),
    "(B,) scores": (
        lambda path, c: _export(BatchScores(), path, c),
        r"returns float32 \(B,\); a program must .* -> float32 \(B, C\)",
    ),
    "(B, C+1) scores": (
        lambda path, c: _export(OneSlotTooMany(), path, c),
        r"returns float32 \(B, {c+1}\); a program must",
    ),
    "int64 scores": (
        lambda path, c: _export(IntegerScores(), path, c),
        r"returns int64 \(B, {c}\); a program must .* -> float32 \(B, C\)",
    ),
    "a fixed batch size": (
        lambda path, c: _export(IntegerScores(), path, c, dynamic=False),
        r"fixes the batch size at 4 for users; export it with .*Dim\('batch'\)",
    ),
    "a bounded batch size": (
        lambda path, c: _export(IntegerScores(), path, c, dynamic=torch.export.Dim("b", max=64)),
        r"bounds the batch size to 0\.\.64 for users",
    ),
    "infinite scores": (
        lambda path, c: _export(InfiniteScores(), path, c),
        r"returned \d+ scores that are NaN or infinite in slots that hold a candidate",
    ),
    "random bytes": (
        lambda path, c: path.write_bytes(np.random.default_rng(0).bytes(4096)),
        r"is not a torch.export program \(a .pt2 from torch.export.save\)",
    ),
    "a state dict": (
        lambda path, c: torch.save(IntegerScores().state_dict(), path),
        r"is not a torch.export program .* but a torch.save file \(a pickle\)",
    ),
    "a pickled module": (
        lambda path, c: torch.save(IntegerScores(), path),
        r"but a torch.save file \(a pickle\)",
    ),
}


@pytest.mark.parametrize("case", REFUSALS, ids=str)
def test_a_program_that_breaks_the_contract_is_refused(
    case: str, trained: Bundle, bundles_dir: Path, tmp_path: Path
) -> None:
    make, message = REFUSALS[case]
    path = tmp_path / "bad.pt2"
    candidates = trained.metadata["model"]["candidates"]
    make(path, candidates)
    message = message.replace("{c}", str(candidates)).replace("{c+1}", str(candidates + 1))
    with pytest.raises(BundleError, match=message) as refusal:
        import_program(bundles_dir, path, like=trained.version)
    assert str(path) in str(refusal.value)
    assert [p.name for p in bundles_dir.iterdir()] == [trained.version]  # no staging left


def test_a_program_whose_archive_holds_a_pickle_is_refused_unopened(
    trained: Bundle, exported: Path, bundles_dir: Path, tmp_path: Path
) -> None:
    # torch.export.load falls back to a full unpickle of example inputs that weights_only
    # refuses: this payload would run there. Vetting the archive refuses it before loading.
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.pt2"
    _rewrite(exported, evil, "data/sample_inputs/model.pt", _pickled_call(os.mkdir, marker))
    with pytest.raises(BundleError, match="example inputs are not plain tensors"):
        import_program(bundles_dir, evil, like=trained.version)
    assert not marker.exists()

    config = json.loads(_read(exported, "data/weights/model_weights_config.json"))
    for meta in config["config"].values():
        meta["use_pickle"] = True
    _rewrite(exported, evil, "data/weights/model_weights_config.json", json.dumps(config).encode())
    with pytest.raises(BundleError, match="as a pickled object, which Encore does not load"):
        import_program(bundles_dir, evil, like=trained.version)

    _rewrite(exported, evil, "data/aotinductor/model/model.so", b"\x7fELF")
    with pytest.raises(BundleError, match=r"'data/aotinductor/model/model\.so', which Encore"):
        import_program(bundles_dir, evil, like=trained.version)
    assert [p.name for p in bundles_dir.iterdir()] == [trained.version]


def test_a_bundle_whose_program_is_missing_or_replaced_does_not_load(
    trained: Bundle, exported: Path, bundles_dir: Path
) -> None:
    imported = import_program(bundles_dir, exported, like=trained.version, version="exported")
    (imported.path / "program.pt2").write_bytes(b"garbage")
    with pytest.raises(BundleError, match=r"program\.pt2 is not a torch\.export program"):
        load_model(imported, top_n=10)
    (imported.path / "program.pt2").unlink()
    with pytest.raises(BundleError, match=r"incomplete: missing program\.pt2"):
        open_bundle(bundles_dir, "exported")


def _read(archive: Path, entry: str) -> bytes:
    with zipfile.ZipFile(archive) as source:
        return source.read(f"{source.namelist()[0].partition('/')[0]}/{entry}")


def _rewrite(archive: Path, target: Path, entry: str, content: bytes) -> None:
    """A copy of ``archive`` with ``entry`` (below its root directory) set to ``content``."""
    with zipfile.ZipFile(archive) as source, zipfile.ZipFile(target, "w") as out:
        root = source.namelist()[0].partition("/")[0]
        for info in source.infolist():
            if info.filename != f"{root}/{entry}":
                out.writestr(info, source.read(info))
        out.writestr(f"{root}/{entry}", content)


def _pickled_call(function, argument) -> bytes:
    class Payload:
        def __reduce__(self):
            return function, (str(argument),)

    buffer = io.BytesIO()
    torch.save(Payload(), buffer)
    return buffer.getvalue()


@pytest.mark.slow
def test_a_promoted_program_publishes_the_lists_its_ranker_published(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home", workers=1, batch_size=64)
    with open_database(settings) as db:
        db.upgrade()
    builtin = publish_random_run(settings, users=USERS)
    ranker = load_ranker(open_bundle(settings.bundles_dir, "random-v1"))
    path = tmp_path / "ranker.pt2"
    torch.export.save(export(ranker, ranker.candidates), path)
    import_program(settings.bundles_dir, path, like="random-v1", version="exported")
    promote(settings.bundles_dir, "exported")

    program = run_full(settings)
    assert program.status == "published" and program.model_version == "exported"
    assert (program.users_scored, program.cold_users) == (builtin.users_scored, builtin.cold_users)
    assert program.popularity_deciles == builtin.popularity_deciles
    users = [7 * (code + 1) for code in range(USERS)]
    with open_online_store(settings) as store:
        lists = store.read(program.run_id, users)
        assert lists == store.read(builtin.run_id, users)
    assert (
        sum(payload is not None for payload in lists) == builtin.users_scored - builtin.cold_users
    )
