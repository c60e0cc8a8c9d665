"""The compiled-kernel cache (vcnn.engines.kernels): private folders, checks, rebuilds, LRU bound."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from vcnn.engines import kernels

SOURCE = "int answer(void) { return 42; }\n"
PLANTED = "int answer(void) { return 666; }\n"
OTHER_UID = 12345
REPO = Path(__file__).resolve().parents[1]


def _has_compiler() -> bool:
    try:
        kernels._compiler()
    except kernels.KernelUnavailable:
        return False
    return True


needs_cc = pytest.mark.skipif(not _has_compiler(), reason="no C compiler (cc, gcc, clang or $CC)")
needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="planting a file owned by another user needs root (chown)"
)


@pytest.fixture
def cache(monkeypatch, tmp_path) -> Path:
    """A fresh process state: the cache in tmp_path/cache, temporary files in tmp_path/tmp."""
    monkeypatch.setenv("VCNN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("VCNN_KERNELS", raising=False)
    monkeypatch.delenv("VCNN_CACHE_MAX_ENTRIES", raising=False)
    monkeypatch.setattr(kernels, "_LIBRARIES", {})
    monkeypatch.setattr(kernels, "_NOTED", set())
    monkeypatch.setattr(kernels, "_PRIVATE", [])
    (tmp_path / "tmp").mkdir(mode=0o700)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    return tmp_path / "cache" / "kernels"


def _answer(source: str = SOURCE) -> int:
    return kernels.compiled_library(source, symbols=("answer",)).answer()


def _compile_plain(source: str, library: Path) -> None:
    """Compile a library with no help from vcnn (as someone planting a file would)."""
    code = library.with_suffix(".c")
    code.write_text(source)
    subprocess.run(
        [kernels._compiler(), "-shared", "-fPIC", str(code), "-o", str(library)], check=True
    )
    code.unlink()


def _plant(library: Path, *, owner: int | None, mode: int) -> None:
    """A library answering 666 with a matching integrity record, owned by ``owner``."""
    _compile_plain(PLANTED, library)
    record = library.with_name(library.name + ".sha256")
    record.write_text(hashlib.sha256(library.read_bytes()).hexdigest() + "\n")
    for path in (library, record):
        if owner is not None:
            os.chown(path, owner, owner)
        os.chmod(path, mode)


def _snapshot(path: Path) -> tuple:
    info = os.lstat(path)
    return info.st_uid, stat.S_IMODE(info.st_mode), info.st_mtime_ns, path.read_bytes()


def _names(source: str = SOURCE) -> list[Path]:
    """Both names a library of ``source`` may be cached under (OpenMP build, serial build)."""
    return [kernels.library_path(source, threaded=threaded) for threaded in (True, False)]


@needs_cc
def test_a_library_is_built_private_and_recorded(cache):
    assert _answer() == 42
    library = kernels.library_path(SOURCE)
    assert library.parent == cache and library.name.startswith("kernel_")
    for folder in (cache, cache.parent):
        assert stat.S_IMODE(os.lstat(folder).st_mode) == 0o700
    assert stat.S_IMODE(os.lstat(library).st_mode) & 0o077 == 0
    record = library.with_name(library.name + ".sha256")
    assert record.read_text().strip() == hashlib.sha256(library.read_bytes()).hexdigest()


@needs_cc
@needs_root
@pytest.mark.parametrize("where", ["group-writable folder", "foreign folder", "foreign file"])
def test_a_library_planted_by_another_user_is_never_loaded(cache, caplog, where):
    cache.mkdir(parents=True, mode=0o700)
    planted = _names()
    for library in planted:
        _plant(library, owner=OTHER_UID, mode=0o664)
    if where == "group-writable folder":
        os.chmod(cache, 0o775)
    elif where == "foreign folder":
        os.chown(cache, OTHER_UID, OTHER_UID)
        os.chmod(cache, 0o755)
    before = [_snapshot(library) for library in planted]
    with caplog.at_level(logging.WARNING, logger="vcnn.engines.kernels"):
        assert _answer() == 42  # built in a private folder, never the planted 666
    assert [_snapshot(library) for library in planted] == before
    assert "kernel cache not used" in caplog.text
    assert str(cache if where != "foreign file" else planted[0]) in caplog.text


@needs_cc
def test_a_group_writable_cache_folder_of_ours_is_refused(cache, caplog):
    cache.mkdir(parents=True)
    os.chmod(cache, 0o770)
    with caplog.at_level(logging.WARNING, logger="vcnn.engines.kernels"):
        assert _answer() == 42
    assert f"{cache} is writable by group or others" in caplog.text
    assert list(cache.iterdir()) == [] and stat.S_IMODE(os.lstat(cache).st_mode) == 0o770


@needs_cc
def test_a_symlinked_cache_folder_is_refused(cache, tmp_path, caplog):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    cache.parent.mkdir(mode=0o700)
    cache.symlink_to(elsewhere)
    with caplog.at_level(logging.WARNING, logger="vcnn.engines.kernels"):
        assert _answer() == 42
    assert f"{cache} is a symbolic link" in caplog.text
    assert list(elsewhere.iterdir()) == []


@needs_cc
def test_a_symlinked_library_is_never_loaded(cache, tmp_path):
    target = tmp_path / "planted.so"
    _plant(target, owner=None, mode=0o700)
    before = _snapshot(target)
    cache.mkdir(parents=True, mode=0o700)
    for library in _names():
        library.symlink_to(target)
        library.with_name(library.name + ".sha256").write_text(
            target.with_name(target.name + ".sha256").read_text()
        )
    assert _answer() == 42
    assert _snapshot(target) == before
    loaded = kernels.library_path(SOURCE)
    assert not loaded.is_symlink() and loaded.read_bytes() != target.read_bytes()


_LOADER = """
import json, logging, sys
logging.basicConfig(level=logging.WARNING)
from vcnn.engines import kernels
answers = {}
for source in json.loads(sys.argv[1]):
    try:
        answers[source] = kernels.compiled_library(source, symbols=("answer",)).answer()
    except kernels.KernelUnavailable as error:
        answers[source] = str(error)
print(json.dumps(answers))
"""


def _replace(path: Path, data: bytes) -> None:
    """Write ``data`` as a new file under ``path`` (a library mapped somewhere stays intact)."""
    scratch = path.with_name(path.name + ".new")
    scratch.write_bytes(data)
    os.chmod(scratch, 0o700)
    os.replace(scratch, path)


@needs_cc
def test_broken_cached_libraries_are_rebuilt_once_and_work(cache, tmp_path):
    compiler = kernels._compiler()
    cases = {
        "truncated": lambda data: data[: len(data) // 2],
        "empty": lambda data: b"",
        "random bytes": lambda data: os.urandom(len(data)),
        "no symbol": None,
    }
    sources = {name: f"/* {name} */\n{SOURCE}" for name in cases}
    folder = kernels._cache_folder()
    lacking = tmp_path / "lacking.so"
    _compile_plain("int other(void) { return 1; }\n", lacking)
    broken = {}
    for name, corrupt in cases.items():
        for threaded in (True, False):
            library = kernels.library_path(sources[name], threaded=threaded)
            kernels._compile(compiler, sources[name], library, extra=kernels._OPENMP * threaded)
            if corrupt is None:  # a valid library with a matching record, but without `answer`
                data = lacking.read_bytes()
                record = library.with_name(library.name + ".sha256")
                _replace(record, (hashlib.sha256(data).hexdigest() + "\n").encode())
            else:
                data = corrupt(library.read_bytes())
            _replace(library, data)
            broken[library] = data
    assert sorted(folder.glob("kernel_*.so")) == sorted(broken)
    # in a child process: a SIGBUS from mapping a truncated file fails the test, not pytest
    result = subprocess.run(
        [sys.executable, "-c", _LOADER, json.dumps(list(sources.values()))],
        capture_output=True, text=True, timeout=120, cwd=REPO, env=os.environ.copy(),
    )
    assert result.returncode == 0, result.stderr
    answers = json.loads(result.stdout)
    assert answers == {source: 42 for source in sources.values()}
    for name in cases:
        library = kernels.library_path(sources[name])
        assert library.read_bytes() != broken[library]
        assert result.stderr.count(f"rebuilding the cached kernel {library}") == 1, name


def test_the_key_covers_compiler_identity_flags_and_libraries(monkeypatch):
    compiler = "/usr/bin/cc"
    identity = {"value": "cc (GCC) 12.2.0\nx86_64-linux-gnu"}
    monkeypatch.setattr(kernels, "_compiler_identity", lambda path: identity["value"])
    first = kernels.cache_key(SOURCE, compiler=compiler)
    assert kernels.cache_key(SOURCE, compiler=compiler) == first
    identity["value"] = "cc (GCC) 13.1.0\nx86_64-linux-gnu"
    upgraded = kernels.cache_key(SOURCE, compiler=compiler)
    assert upgraded != first
    monkeypatch.setattr(kernels, "_FLAGS", (*kernels._FLAGS, "-DNDEBUG"))
    flagged = kernels.cache_key(SOURCE, compiler=compiler)
    monkeypatch.setattr(kernels, "_LINK", (*kernels._LINK, "-lpthread"))
    linked = kernels.cache_key(SOURCE, compiler=compiler)
    other_path = kernels.cache_key(SOURCE, compiler="/opt/other/cc")
    other_source = kernels.cache_key(SOURCE + " ", compiler=compiler)
    keys = [first, upgraded, flagged, linked, other_path, other_source]
    assert len(set(keys)) == len(keys)


@needs_cc
def test_the_compiler_identity_is_its_version_output():
    identity = kernels._compiler_identity(kernels._compiler())
    assert "--version: 0 " in identity and "-dumpmachine: 0 " in identity


@needs_cc
def test_the_cache_keeps_the_most_recently_used_within_the_bound(cache, monkeypatch):
    monkeypatch.setenv("VCNN_CACHE_MAX_ENTRIES", "2")
    a, b, c = (f"/* {name} */\n{SOURCE}" for name in "abc")
    assert _answer(a) == 42 and _answer(b) == 42
    monkeypatch.setattr(kernels, "_LIBRARIES", {})  # a new process: a is loaded, and used
    assert _answer(a) == 42
    assert _answer(c) == 42
    kept = sorted(cache.glob("kernel_*.so"))
    assert kept == sorted([kernels.library_path(a), kernels.library_path(c)])
    assert sorted(cache.glob("kernel_*.so.sha256")) == [
        p.with_name(p.name + ".sha256") for p in kept
    ]


_FALLBACK = """
import tempfile
from vcnn.engines import kernels
print(kernels.compiled_library("int answer(void) { return 42; }", symbols=("answer",)).answer())
print(kernels._PRIVATE[0], oct(kernels._PRIVATE[0].stat().st_mode & 0o777))
"""


@needs_cc
@pytest.mark.parametrize("primary", ["unwritable", "unsafe"])
def test_without_a_usable_cache_no_predictable_path_is_used(tmp_path, primary):
    shared = tmp_path / "tmp"
    shared.mkdir(mode=0o700)
    if primary == "unwritable":  # a path through a file cannot be made, even by root
        (tmp_path / "file").write_text("")
        cache = tmp_path / "file" / "cache"
    else:
        cache = tmp_path / "cache"
        (cache / "kernels").mkdir(parents=True)
        os.chmod(cache / "kernels", 0o777)
    env = {**os.environ, "VCNN_CACHE_DIR": str(cache), "TMPDIR": str(shared)}
    env.pop("VCNN_KERNELS", None)
    result = subprocess.run(
        [sys.executable, "-c", _FALLBACK], capture_output=True, text=True, timeout=120,
        cwd=REPO, env=env,
    )
    assert result.returncode == 0, result.stderr
    answer, private = result.stdout.splitlines()
    assert answer == "42"
    folder, mode = private.split()
    assert Path(folder).parent == shared and mode == "0o700"
    assert list(shared.iterdir()) == []  # the private folder is removed at exit
    assert "building the kernels in a private temporary folder" in result.stderr
    if primary == "unsafe":
        assert list((cache / "kernels").iterdir()) == []


@needs_cc
def test_when_no_folder_is_safe_the_kernel_is_cleanly_unavailable(cache, tmp_path, monkeypatch):
    open_to_all = tmp_path / "open"
    open_to_all.mkdir()
    os.chmod(open_to_all, 0o777)  # writable by others and not sticky: nothing private in it
    monkeypatch.setattr(tempfile, "tempdir", str(open_to_all))
    cache.mkdir(parents=True)
    os.chmod(cache, 0o777)
    with pytest.raises(kernels.KernelUnavailable, match="private temporary folder") as caught:
        _answer()
    assert str(cache) in str(caught.value) and "not sticky" in str(caught.value)
    with pytest.raises(kernels.KernelUnavailable):  # remembered for the process
        _answer()
    assert not any(p.name.startswith("vcnn-kernels-") for p in open_to_all.iterdir())
    for folder in kernels._PRIVATE:
        shutil.rmtree(folder, ignore_errors=True)


@needs_cc
def test_a_library_without_the_requested_symbol_is_unavailable(cache):
    assert _answer() == 42
    with pytest.raises(kernels.KernelUnavailable, match="has no missing_function"):
        kernels.compiled_library(SOURCE, symbols=("missing_function",))
