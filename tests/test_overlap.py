"""t2v/train/overlap.py: gradients averaged in buckets during the backward pass, 2 processes
over gloo, against the all-reduce of the whole gradients after it."""

from __future__ import annotations

import json
import textwrap

OVERLAP_SCRIPT = textwrap.dedent("""
    import copy, json, os, sys, torch, torch.distributed as dist
    rank, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    from t2v.train.overlap import OverlappedReduce

    class Net(torch.nn.Module):  # `late` is registered first but gets its gradient last;
        def __init__(self):  # `unused` never gets one
            super().__init__()
            self.late = torch.nn.Parameter(torch.randn(3))
            self.unused = torch.nn.Parameter(torch.randn(5))
            self.a, self.b = torch.nn.Linear(3, 8), torch.nn.Linear(8, 2)
            self.frozen = torch.nn.Parameter(torch.randn(2), requires_grad=False)
        def forward(self, x):
            return self.b(torch.tanh(self.a(x * self.late))) + self.frozen

    torch.manual_seed(0)
    ref = Net()
    result = {}
    for bucket_bytes in (1, 1 << 20):  # a bucket per parameter, or one for all
        net = copy.deepcopy(ref)
        red = OverlappedReduce(net.parameters(), bucket_bytes=bucket_bytes)
        want = copy.deepcopy(ref)
        g = torch.Generator().manual_seed(10 + rank)  # each rank its own data
        xs = [torch.randn(4, 3, generator=g) for _ in range(2)]
        # two micro-batches: only the second backward (armed) reduces
        net(xs[0]).pow(2).mean().backward()
        red.arm()
        net(xs[1]).pow(2).mean().backward()
        red.finish()
        for x in xs:
            want(x).pow(2).mean().backward()
        local = {n: p.grad.clone() for n, p in want.named_parameters() if p.grad is not None}
        for p in want.parameters():
            if p.requires_grad:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
                p.grad.div_(2)
        got = dict(net.named_parameters())
        result[str(bucket_bytes)] = {
            "buckets": len(red.buckets),
            "diff": {n: (got[n].grad - p.grad).abs().max().item()
                     for n, p in want.named_parameters() if p.requires_grad},
            "frozen": got["frozen"].grad is None,
            "reduced": all(not torch.allclose(local[n], got[n].grad) for n in local)}
        try:
            red.finish()
        except RuntimeError as e:
            result[str(bucket_bytes)]["error"] = str(e)
        if bucket_bytes == 1:  # a second gradient after its bucket was sent: refused
            def twice(x):  # the inner backward accumulates `late` (a leaf) on its own
                with torch.enable_grad():
                    y = (x.detach().requires_grad_() * net.late).sum()
                    torch.autograd.backward(y)
                return x * net.late
            red.arm()
            try:
                twice(xs[0]).sum().backward()
            except RuntimeError as e:
                result["1"]["twice"] = str(e)
        red.remove()
    json.dump(result, open(f"{out}.{rank}", "w"))
""")


def test_overlapped_reduce_averages_like_one_all_reduce_after_the_backward_pass(tmp_path):
    """Buckets launched in a fixed order whatever order the gradients come in (a parameter
    registered first and reached last), a parameter without a gradient averaged as zeros, a
    frozen one left alone, the unarmed micro-batch accumulated locally: the means equal the
    whole gradients' all-reduce after both backward passes, on both ranks; finish() without
    arm() is refused, and so is a parameter's second gradient in one backward pass (an inner
    backward, as reentrant checkpointing makes) after its bucket was sent."""
    from tests.ranks import run_ranks
    from tests.s3_fixtures import free_port

    script, out, port = tmp_path / "ov.py", tmp_path / "ov", str(free_port())
    script.write_text(OVERLAP_SCRIPT)
    run_ranks(script, 2, port, out)
    for rank in range(2):
        result = json.loads((tmp_path / f"ov.{rank}").read_text())
        assert result["1"]["buckets"] == 6 and result[str(1 << 20)]["buckets"] == 1
        for r in result.values():
            assert set(r["diff"]) == {"late", "unused", "a.weight", "a.bias", "b.weight",
                                      "b.bias"}
            assert max(r["diff"].values()) < 1e-6, r["diff"]
            assert r["frozen"] and r["reduced"]  # each rank's own data: the means differ
            assert r["error"].startswith("OverlappedReduce.finish() without arm()")
        assert "got a second gradient in one backward pass" in result["1"]["twice"]
