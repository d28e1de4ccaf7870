"""Ulysses sequence parallelism (t2v/models/sequence_parallel.py): 2 processes over gloo, SP 2,
against the same model in one process."""

from __future__ import annotations

import json
import textwrap

SP_SCRIPT = textwrap.dedent("""
    import copy, json, os, sys, torch, torch.distributed as dist
    rank, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    from t2v.models.dit import VideoDiT, dit_config
    from t2v.models.sequence_parallel import parallelize, reduce_gradients
    torch.manual_seed(0)
    model = VideoDiT(dit_config("debug", in_channels=4, text_dim=16))
    with torch.no_grad():  # adaLN-zero leaves gates and head at 0: give every path a gradient
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 3, 6, 6, generator=g)  # 3 x 3 x 3 = 27 tokens: not divisible by 2
    t, target = torch.rand(2, generator=g), torch.randn(2, 4, 3, 6, 6, generator=g)
    text, mask = torch.randn(2, 5, 16, generator=g), torch.tensor([[1] * 5, [1, 1, 0, 0, 0]])
    result = {}
    for checkpointing in (False, True):
        ref, sp = copy.deepcopy(model), parallelize(copy.deepcopy(model))
        for m in (ref, sp):
            m.train()
            m.checkpointing = checkpointing
        loss_ref = (ref(x, t, text, mask) - target).pow(2).mean()
        loss_ref.backward()
        v = sp(x, t, text, mask)
        loss_sp = (v - target).pow(2).mean()
        loss_sp.backward()
        reduce_gradients(sp)
        grads = {n: (p.grad - q.grad).abs().max().item() / (q.grad.abs().max().item() + 1e-12)
                 for (n, p), (_, q) in zip(sp.named_parameters(), ref.named_parameters())}
        result[str(checkpointing)] = {
            "loss": [loss_sp.item(), loss_ref.item()], "grads": grads,
            "names": [n for n, _ in sp.named_parameters()] == [n for n, _ in ref.named_parameters()],
            "zero_grads": [n for n, q in ref.named_parameters() if not q.grad.abs().max() > 0]}
    try:
        parallelize(VideoDiT(dit_config("debug", in_channels=4, text_dim=16, heads=1, dim=64)))
    except ValueError as e:
        result["error"] = str(e)
    if rank == 0:
        json.dump(result, open(out, "w"))
""")


def test_ulysses_matches_one_process_loss_and_every_gradient(tmp_path):
    """Loss and every parameter's gradient of the sequence-parallel model (2 ranks, 27 tokens:
    padded; text mask with a padded row) equal the one-process model's, with and without
    activation checkpointing; parameter names are unchanged; heads must divide by SP."""
    from tests.ranks import run_ranks
    from tests.s3_fixtures import free_port

    script, out, port = tmp_path / "sp.py", tmp_path / "sp.json", str(free_port())
    script.write_text(SP_SCRIPT)
    run_ranks(script, 2, port, out)
    result = json.loads(out.read_text())
    for checkpointing in ("False", "True"):
        r = result[checkpointing]
        assert r["names"] and r["zero_grads"] == []
        assert abs(r["loss"][0] - r["loss"][1]) <= 1e-6 * abs(r["loss"][1]), r["loss"]
        worst = max(r["grads"], key=r["grads"].get)
        assert r["grads"][worst] < 1e-5, (checkpointing, worst, r["grads"][worst])
    assert result["error"] == "sequence_parallel=2 must divide the DiT's 1 heads"


LAYOUT_SCRIPT = textwrap.dedent("""
    import json, os, sys, torch, torch.distributed as dist
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank),
                      WORLD_SIZE=str(world))
    dist.init_process_group("gloo")
    from t2v.data.collate import LatentBatch
    from t2v.train.parallel import make_layout
    result = {}
    try:  # 3 ranks on one "node", 1 on another: a group of 2 would span them
        make_layout(2, rank, world, rank if rank < 3 else 0, 3 if rank < 3 else 1)
    except ValueError as e:
        result["error"] = str(e)
    layout = make_layout(2, rank, world, rank, world)  # one node of 4: groups {0, 1}, {2, 3}
    def stream():  # what each rank's Ray Data split would yield: only leaders may read it
        assert layout.is_leader, "a follower read the stream"
        for i in range(3):
            g = layout.rank * 10 + i
            yield LatentBatch(latent=torch.full((2, 4, 1, 2, 2), float(g)),
                              text=torch.full((2, 3, 8), float(g)),
                              mask=torch.ones(2, 3, dtype=torch.bool),
                              captions=[f"c{g}", "x"], keys=[f"k{g}", "y"])
    got = [(b.keys[0], b.latent.mean().item(), b.text.shape[-1], b.mask.dtype == torch.bool)
           for b in layout.batches(stream(), torch.device("cpu"))]
    result.update(got=got, dp=layout.data_parallel, leader=layout.leader,
                  scale=layout.loss_scale)
    json.dump(result, open(f"{out}.{rank}", "w"))
""")


def test_layout_groups_ranks_and_shares_the_leaders_batches(tmp_path):
    """4 gloo ranks, sequence_parallel 2: groups {0, 1} and {2, 3}; every rank of a group gets
    its leader's batches (tensors and fields) and only leaders read; a layout that would put a
    group across two nodes is refused on every rank with one line."""
    from tests.ranks import run_ranks
    from tests.s3_fixtures import free_port

    script, out, port = tmp_path / "layout.py", tmp_path / "layout", str(free_port())
    script.write_text(LAYOUT_SCRIPT)
    run_ranks(script, 4, 4, port, out)
    results = [json.loads((tmp_path / f"layout.{r}").read_text()) for r in range(4)]
    for r, res in enumerate(results):
        leader = r - r % 2
        assert res["got"] == [[f"k{leader * 10 + i}", leader * 10 + i, 8, True]
                              for i in range(3)]
        assert (res["dp"], res["leader"], res["scale"]) == (2, leader, 2.0)
        assert res["error"].startswith("sequence_parallel=2: a node runs 3 workers (ranks 0-2")
