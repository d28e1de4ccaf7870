"""Checkpoint pieces read where they lie (local disk or S3), by byte range (t2v/train/checkpoint.py).

Saving, restoring into DeepSpeed and elastic resume: tests/test_train_units.py (2 processes) and
tests/test_train.py (Ray Train, S3)."""

from __future__ import annotations

import pytest
import torch


def test_checkpoint_pieces_read_across_any_cut(tmp_path):
    """Pieces of a tensor saved by 3 ranks (a 5-element bias: 2, 2, 1) read back over any
    range; a whole 2-D bf16 tensor (no @START) reads as the piece at 0; many small pieces
    close together come in one read; a gap is reported."""
    from safetensors.torch import save_file

    from t2v.train.checkpoint import open_local

    b = torch.arange(5.0)
    (tmp_path / "state").mkdir()
    for rank, (lo, hi) in enumerate(((0, 2), (2, 4), (4, 5))):
        save_file({f"param/b@{lo}": b[lo:hi].clone()},
                  str(tmp_path / "state" / f"rank-{rank}.safetensors"))
    small = {f"param/n{i}@0": torch.full((64,), float(i)) for i in range(50)}
    save_file({"w": torch.arange(6.0).view(2, 3).bfloat16(), **small},
              str(tmp_path / "state" / "rank-9.safetensors"))
    (tmp_path / "trainer.json").write_text('{"step": 1}')
    _, pieces = open_local(tmp_path)
    for start, count in ((0, 5), (1, 3), (3, 2), (4, 1)):
        out = torch.full((count,), -1.0)
        pieces.read([("param/b", start, out)])
        assert torch.equal(out, b[start:start + count])
    assert torch.equal(pieces.whole("w", 6), torch.arange(6.0))
    reads, outs = pieces.reads, [torch.empty(64) for _ in small]
    pieces.read([(f"param/n{i}", 0, out) for i, out in enumerate(outs)])
    assert pieces.reads == reads + 1 and all((o == i).all() for i, o in enumerate(outs))
    (tmp_path / "state" / "rank-1.safetensors").unlink()
    with pytest.raises(ValueError, match=r"does not cover param/b@0 \(3 of 5 elements"):
        open_local(tmp_path)[1].whole("param/b", 5)


def test_checkpoint_pieces_read_only_their_bytes_from_s3(moto_s3, s3_bucket, tmp_path):
    """A checkpoint in S3 is read where it lies, by byte range: a rank asking for its quarter of
    a 3-file checkpoint reads exactly those bytes (plus the headers), and the values are exact."""
    from safetensors.torch import save_file

    from t2v import arrowfs, storage
    from t2v.train.checkpoint import open_checkpoint

    n = 3 << 20  # 3 x 4 MiB of float32 per kind: pieces far apart, as in a real checkpoint
    whole = {k: torch.randn(n) for k in ("param/w", "exp_avg/w", "exp_avg_sq/w")}
    uri = storage.join(s3_bucket, "run", "checkpoint_x")
    for rank in range(3):
        lo, hi = rank * n // 3, (rank + 1) * n // 3
        path = tmp_path / f"rank-{rank:05d}.safetensors"
        save_file({f"{k}@{lo}": t[lo:hi].clone() for k, t in whole.items()}, str(path))
        storage.upload_file(path, storage.join(uri, "state", path.name))
    storage.write_text(storage.join(uri, "trainer.json"), '{"step": 7}')
    fs, path = arrowfs.pyarrow_filesystem(uri)
    saved, pieces = open_checkpoint(fs, path)
    assert saved == {"step": 7} and len(pieces.paths) == 3
    headers, reads = pieces.bytes_read, pieces.reads
    lo, hi = n // 4, n // 2  # the 2nd of 4 ranks: across the cut of files 0 and 1
    outs = {k: torch.empty(hi - lo) for k in whole}
    pieces.read([(k, lo, outs[k]) for k in whole])
    for k, t in whole.items():
        assert torch.equal(outs[k], t[lo:hi]), k
    assert pieces.bytes_read - headers == 3 * (hi - lo) * 4
    assert pieces.reads - reads == 3 * 2  # 3 kinds x the 2 files the quarter spans
    assert pieces.bytes_read < 0.26 * pieces.total_bytes
