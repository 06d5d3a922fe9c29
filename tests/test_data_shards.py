"""Token shards (issue 15): uint32 ids with document offsets, atomic writes, resumable shard
markers, memory-mapped reading, and one clear error for every kind of damaged shard directory."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from opengemma.data.shards import (
    ShardSet,
    ShardWriter,
    build_shard_set,
    file_sha256,
    finished_shards,
    read_manifest,
    source_totals,
    write_manifest,
)
from opengemma.errors import OpenGemmaError


def _docs(seed: int, n: int, hi: int = 262_144) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, hi, size=int(rng.integers(1, 300))) for _ in range(n)]


def test_writer_round_trip_with_bos_eos_and_rolling(tmp_path):
    docs = _docs(0, 200)
    docs[3] = np.array([65_535, 65_536, 262_143, 2**32 - 1])  # ids past 16 bits survive
    with ShardWriter(tmp_path / "shards" / "web", shard_tokens=5000) as w:
        for d in docs:
            w.add(d.tolist(), bos=2, eos=1)
    paths = w.close()
    assert len(paths) > 3 and paths[0] == "shards/web/00000.bin" and paths[1] == "shards/web/00001.bin"
    total = sum(len(d) + 2 for d in docs)
    assert (w.tokens, w.docs) == (total, 200)
    write_manifest(tmp_path, {"sources": {"web": {"shards": paths, "tokens": total, "docs": 200}}})
    src = ShardSet.open(tmp_path).source("web")
    assert (src.num_docs, src.num_tokens) == (200, total)
    for i, d in enumerate(docs):
        got = src.doc(i)
        assert got.dtype == np.uint32 and src.doc_length(i) == len(d) + 2
        assert got.tolist() == [2, *d.tolist(), 1]
    assert [len(x) for x in src.iter_docs()] == src.doc_lengths().tolist()
    for shard in src.shards:  # rolled only between documents, just past shard_tokens
        meta = json.loads(shard.path.with_suffix(".json").read_text())
        assert meta["sha256"] == file_sha256(shard.path) and meta["tokens"] == len(shard.tokens)
        assert meta["tokens"] < 5000 + 302
    assert source_totals(paths, tmp_path) == {"tokens": total, "docs": 200}


def test_bad_ids_are_refused(tmp_path):
    w = ShardWriter(tmp_path / "s", vocab_size=1000)
    for bad in ([-1], [2**32], [1000], [[1, 2]], ["a"], [0.5]):
        with pytest.raises(OpenGemmaError):
            w.add(bad)
    w.add([])  # an empty document is skipped
    w.add(np.array([], dtype=np.int64), bos=None)
    assert w.close() == [] and w.docs == 0


def test_failed_write_leaves_only_finished_shards(tmp_path):
    folder = tmp_path / "shards" / "web"
    with pytest.raises(RuntimeError):
        with ShardWriter(folder, shard_tokens=100) as w:
            for d in _docs(1, 50):
                w.add(d)
            raise RuntimeError("killed")
    finished = finished_shards(folder)
    assert finished and finished == [f"{i:05d}" for i in range(len(finished))]
    leftovers = sorted(p.name for p in folder.iterdir())
    assert not [p for p in leftovers if p.startswith(".")]  # no temp files
    # every file belongs to a finished shard: nothing half-written under a final name
    assert {p.split(".")[0] for p in leftovers} == set(finished)


def test_resume_rewrites_an_unfinished_shard(tmp_path):
    folder = tmp_path / "shards" / "code"
    with ShardWriter(folder, shard_tokens=10**6) as w:
        w.add([5, 6, 7])
    (folder / "00000.json").unlink()  # as if killed before its .json
    assert finished_shards(folder) == []
    with ShardWriter(folder, start_index=0) as w:
        w.add([8, 9])
    assert finished_shards(folder) == ["00000"]
    write_manifest(tmp_path, {"sources": {"code": {"shards": w.close()}}})
    assert ShardSet.open(tmp_path).source("code").doc(0).tolist() == [8, 9]


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


@pytest.fixture
def shard_dir(tmp_path):
    build_shard_set(tmp_path / "d", {"web": _docs(2, 40), "wiki": _docs(3, 10)}, heldout={"web": _docs(4, 5)},
                    stages=[{"name": "main", "tokens": 1000, "weights": {"web": 0.5, "wiki": 0.5}}],
                    tokenizer={"vocab_size": 262144, "bos_id": 2, "eos_id": 1, "pad_id": 0}, bos=2, eos=1)
    return tmp_path / "d"


def test_open_reads_manifest_splits_and_verify(shard_dir):
    ss = ShardSet.open(shard_dir, verify=True)
    assert ss.sources == ["web", "wiki"] and ss.stages[0]["name"] == "main"
    assert ss.source("web", "heldout").num_docs == 5 and ss.source("wiki", "heldout").num_docs == 0
    m = read_manifest(shard_dir)
    assert m["format"] == "opengemma-shards" and m["sources"]["web"]["heldout"] == ["heldout/web/00000.bin"]
    assert m["sources"]["web"]["heldout_tokens"] == ss.source("web", "heldout").num_tokens
    assert "web:" in repr(ss)
    with pytest.raises(OpenGemmaError, match="no source 'code'"):
        ss.source("code")


@pytest.mark.parametrize("damage, message", [
    ("truncate", "corrupt or truncated"),
    ("drop_json", "unfinished shard"),
    ("drop_bin", "is missing"),
    ("bad_index", "document index"),
    ("bad_manifest", "not valid JSON"),
    ("no_manifest", "no manifest.json"),
    ("count", "the manifest says"),
    ("version", "version 99 is not supported"),
])
def test_damaged_directories_fail_with_one_line(shard_dir, damage, message):
    shard = shard_dir / "shards" / "web" / "00000"
    if damage == "truncate":
        with open(f"{shard}.bin", "r+b") as f:
            f.truncate(os.path.getsize(f"{shard}.bin") - 4)
    elif damage == "drop_json":
        os.unlink(f"{shard}.json")
    elif damage == "drop_bin":
        os.unlink(f"{shard}.bin")
    elif damage == "bad_index":
        np.save(f"{shard}.idx.npy", np.array([0, 5, 3], dtype=np.uint64))
    elif damage == "bad_manifest":
        (shard_dir / "manifest.json").write_text("{not json")
    elif damage == "no_manifest":
        (shard_dir / "manifest.json").unlink()
    else:
        m = json.loads((shard_dir / "manifest.json").read_text())
        if damage == "count":
            m["sources"]["web"]["tokens"] += 1
        else:
            m["version"] = 99
        (shard_dir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(OpenGemmaError) as e:
        ShardSet.open(shard_dir)
    assert message in _one_line(e)


def test_flipped_byte_is_caught_by_sha256(shard_dir):
    path = shard_dir / "shards" / "wiki" / "00000.bin"
    data = bytearray(path.read_bytes())
    data[7] ^= 0xFF
    path.write_bytes(bytes(data))
    ShardSet.open(shard_dir)  # sizes still match: only the hash can tell
    with pytest.raises(OpenGemmaError) as e:
        ShardSet.open(shard_dir, verify=True)
    assert "SHA-256 does not match" in _one_line(e)


def test_manifest_is_checked_on_write(tmp_path):
    with pytest.raises(OpenGemmaError, match="'sources' must be a non-empty object"):
        write_manifest(tmp_path, {"sources": {}})
    assert not (tmp_path / "manifest.json").exists()
    with pytest.raises(OpenGemmaError, match="no such shard directory"):
        read_manifest(tmp_path / "missing")


def test_parallel_writers_name_their_own_shards(tmp_path):
    folder = tmp_path / "shards" / "web"
    with ShardWriter(folder, shard_tokens=3, prefix="w1.", start_index=7) as a, ShardWriter(folder, prefix="w0.") as b:
        for d in ([1, 2, 3], [4], [5, 6, 7, 8]):
            a.add(d)
            b.add(d)
    assert a.close() == ["shards/web/w1.00007.bin", "shards/web/w1.00008.bin"]  # [1, 2, 3] | [4] [5, 6, 7, 8]
    assert b.close() == ["shards/web/w0.00000.bin"]
    assert finished_shards(folder) == ["w0.00000", "w1.00007", "w1.00008"]
