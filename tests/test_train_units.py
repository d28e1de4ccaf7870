"""Training pieces against their formulas: LR schedule, EMA, per-sample seeds, and DeepSpeed's
gradient clipping and accumulation as our worker configures them (one process, gloo)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from t2v.train.schedule import EMA, Fragment, lr_factor, per_sample_generators, sample_seed


@pytest.mark.parametrize("kind", ["cosine", "constant"])
def test_lr_schedule_formula(kind):
    base = dict(warmup=10, total=110, kind=kind, min_ratio=0.1)
    assert [lr_factor(s, **base) for s in range(3)] == [0.1, 0.2, 0.3]
    assert lr_factor(9, **base) == 1.0
    for s in (10, 35, 60, 85, 110, 500):
        p = min(1.0, (s - 10) / 100)
        want = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)) if kind == "cosine" else 1.0
        assert lr_factor(s, **base) == pytest.approx(want, abs=1e-12)
    with pytest.raises(ValueError, match="unknown LR schedule"):
        lr_factor(20, warmup=0, total=10, kind="linear", min_ratio=0)


def test_ema_formula_with_and_without_warmup():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    for warmup in (False, True):
        ema = EMA.of_module(model, decay=0.9, warmup=warmup)
        ref = {k: v.clone() for k, v in model.named_parameters()}
        for n in range(1, 6):
            new = {k: torch.randn_like(v) for k, v in ref.items()}
            ema.update(Fragment(k, 0, v) for k, v in new.items())
            d = min(0.9, (1 + n) / (10 + n)) if warmup else 0.9
            ref = {k: d * ref[k] + (1 - d) * new[k] for k in ref}
            for k, v in ema.whole().items():
                torch.testing.assert_close(v, ref[k].flatten(), rtol=0, atol=1e-6)
        state = ema.state_dict()
        other = EMA.of_module(model, decay=0.9, warmup=warmup)
        other.load_state_dict(state)
        assert other.updates == 5 and other.current_decay() == ema.current_decay()
        assert all(torch.equal(other.whole()[k], v) for k, v in ema.whole().items())
        with pytest.raises(ValueError, match="fragments"):
            ema.update([Fragment("weight", 0, new["weight"])])  # the bias is missing


def test_adamw_factory_is_fused_and_follows_the_adamw_formula():
    """schedule.adamw: the config's hyper-parameters, torch's fused kernel on CPU (unless
    `fused: false`), and three steps equal to AdamW written out by hand."""
    from t2v.config import OptimConfig
    from t2v.train.schedule import adamw, step_count

    optim = OptimConfig(lr=0.01, betas=[0.9, 0.95], weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(3, 4, generator=gen)
    grads = [torch.randn(3, 4, generator=gen) for _ in range(3)]
    for fused in (True, False):
        w = torch.nn.Parameter(w0.clone())
        opt = adamw([w], optim.model_copy(update={"fused": fused}))
        assert bool(opt.param_groups[0]["fused"]) is fused
        ref, m, v = w0.clone(), torch.zeros_like(w0), torch.zeros_like(w0)
        for t, g in enumerate(grads, start=1):
            w.grad = g.clone()
            opt.step()
            ref = ref * (1 - 0.01 * 0.1)  # decoupled weight decay
            m, v = 0.9 * m + 0.1 * g, 0.95 * v + 0.05 * g * g
            ref = ref - 0.01 * (m / (1 - 0.9**t)) / ((v / (1 - 0.95**t)).sqrt() + 1e-8)
            torch.testing.assert_close(w.detach(), ref, rtol=1e-5, atol=1e-6)
        step = step_count(opt, w, 3)
        assert step.dtype == torch.float32 and float(step) == 3.0
        assert step.device == opt.state[w]["step"].device


ZERO_SCRIPT = textwrap.dedent("""
    import json, os, sys, torch, torch.distributed as dist
    rank, out = int(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    linear = torch.nn.functional.linear
    from t2v.config import TrainConfig
    from t2v.models.dit import VideoDiT, dit_config
    from t2v.train import checkpoint, zero
    from t2v.train.schedule import EMA, lr_factor
    from t2v.train.worker import deepspeed_config, initialize_engine
    geo = dit_config("debug", in_channels=4, text_dim=16)
    def run(phase, world):
        accum = 2 // world  # global batch 4: 2 workers x 2, or 1 worker x 2 x 2 micro-batches
        def save(d, eng, ema, shapes, step, **extra):
            os.makedirs(d, exist_ok=True)
            checkpoint.save_state(eng, ema, d, rank, world)
            if rank == 0:
                state = checkpoint.trainer_state(eng, ema, shapes, step, 4 * step, world, accum)
                lr = eng.optimizer.param_groups[0]["lr"]
                json.dump(state | extra | {"lr": lr}, open(f"{d}/trainer.json", "w"))
            dist.barrier()
        for name, stage in (("z0", 0), ("z2", 2), ("z3", 3)):
            ds = deepspeed_config(TrainConfig(batch_size=2, grad_accum=accum, zero_stage=stage), False)
            torch.manual_seed(0)
            model = zero.build_model(lambda whole: VideoDiT(geo, whole), stage, ds,
                                     torch.device("cpu"))
            held = sum(p.ds_tensor.numel() if zero.is_partitioned(p) else p.numel()
                       for p in model.parameters())  # right after construction
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(
                s, warmup=3, total=6, kind="cosine", min_ratio=0.1))
            eng = initialize_engine(model, opt, sched, ds, use_gpu=False)
            o = eng.optimizer  # ZeRO-3 in fp32: the optimizer steps the weights' own partition
            shared = [a.data_ptr() == b.data_ptr() for a, b in zip(
                getattr(o, "fp16_partitioned_groups_flat", []),
                getattr(o, "fp32_partitioned_groups_flat", [])) if a.numel()]
            ema = EMA(zero.local_fragments(eng.module, rank, world), 0.9)
            shapes = zero.full_shapes(eng.module)
            step, run = 0, f"{out}/{name}"
            if phase != "a":  # b: resume a's step 2 on 1 worker; c: b's step 3 on 2 workers again
                src = f"{run}/a2" if phase == "b" else f"{run}/b3"
                saved, pieces = checkpoint.open_local(src)
                checkpoint.restore_state(eng, ema, saved, pieces, rank, world, sched)
                step = saved["step"]
            while step < 4:
                for m in range(accum):  # sample i of a step is the same data on any worker count
                    g = torch.Generator().manual_seed(1000 * step + rank * accum + m)
                    x, t = torch.randn(2, 4, 3, 8, 8, generator=g), torch.rand(2, generator=g)
                    txt = torch.randn(2, 5, 16, generator=g)
                    eng.backward((eng(x, t, txt) - x).pow(2).mean())
                    eng.step()
                step += 1
                ema.update(zero.local_fragments(eng.module, rank, world))
                if (phase, step) in (("a", 2), ("b", 3)):
                    save(f"{run}/{phase}{step}", eng, ema, shapes, step)
            save(f"{run}/{phase}-final", eng, ema, shapes, step, held=held, shared=shared)
        if phase == "a":  # fine-tuning a package (its own LoRA merged) with new adapters, through
            import types, deepspeed  # the DiT task's build: partitioned == unpartitioned
            from t2v.models.lora import add_lora, lora_state_dict
            from t2v.models.package import RenderDefaults, load_package, save_package
            from t2v.models.text import TextEncoderConfig
            from t2v.models.vae import CausalVideoVAE, vae_config
            from t2v.train.stages import task_for
            pkg = f"{out}/pkg"
            if rank == 0:
                torch.manual_seed(1)
                src = VideoDiT(geo)
                adapted = add_lora(VideoDiT(geo), 4, 4.0, 0.0, ("qkv",), None)
                for n, q in adapted.named_parameters():
                    if "lora_B" in n:
                        torch.nn.init.normal_(q)  # a LoRA that changes the weights
                save_package(pkg, vae=CausalVideoVAE(vae_config("debug", latent_channels=4)),
                             dit=src, render=RenderDefaults(frames=9, height=32, width=32, fps=8.0,
                                                            shift=1.0),
                             text=TextEncoderConfig(), lora=lora_state_dict(adapted),
                             lora_meta={"rank": 4, "alpha": 4.0})
            dist.barrier()
            cfg = TrainConfig(stage="dit", batch_size=2, zero_stage=3, init_from=pkg,
                              lora={"rank": 4, "alpha": 4.0, "target_modules": ["qkv", "out"]})
            task = task_for(cfg)
            info = types.SimpleNamespace(latent_shape=(4, 3, 8, 8), empty_text=torch.zeros(5, 16))
            ds = deepspeed_config(cfg, False)
            torch.manual_seed(2)
            z3 = zero.build_model(lambda whole: task.build_model(info, whole), 3, ds,
                                  torch.device("cpu"))
            torch.manual_seed(2)
            plain = task.build_model(info, None)
            merged = dict(load_package(pkg, load_text=False, load_vae=False).dit.named_parameters())
            same = True
            for (n, p), (_, q) in zip(z3.named_parameters(), plain.named_parameters(), strict=True):
                with deepspeed.zero.GatheredParameters([p]):
                    same &= torch.equal(p.detach(), q.detach())
            base = {n.replace(".base_layer.", "."): q for n, q in plain.named_parameters()
                    if "lora_" not in n}
            loaded = base.keys() == merged.keys() and all(torch.equal(base[k], v)
                                                          for k, v in merged.items())
            b_zero = all(not q.any() for n, q in plain.named_parameters() if "lora_B" in n)
            if rank == 0:
                json.dump({"same": bool(same), "loaded": loaded, "b_zero": b_zero},
                          open(f"{out}/lora.json", "w"))
    # The three phases in the same two processes (a fresh one costs ~5 s of a core in imports
    # here), each in a process group of its own (met in a file: no port to choose); rank 1
    # sits b out. DeepSpeed's own teardown also drops the groups it cached.
    for phase, world in (("a", 2), ("b", 1), ("c", 2)):
        if rank < world:
            os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
            dist.init_process_group("gloo", init_method=f"file://{out}/group-{phase}",
                                    rank=rank, world_size=world)
            run(phase, world)
            zero.import_deepspeed(False).comm.destroy_process_group()
            # ZeRO-3's zero.Init swaps F.linear for its own for the whole process (its log:
            # "This will persist unless manually reset"), whose gradients differ from torch's
            # by an ulp: put torch's back, as in a fresh process.
            torch.nn.functional.linear = linear
""")


def test_zero_stages_agree_and_resume_on_another_worker_count(tmp_path):
    """2 processes (gloo), the debug DiT at ZeRO-0, 2 and 3 (ZeRO-1 is ZeRO-2's optimizer class;
    ZeRO-3 with activation checkpointing: tests/test_train.py), 4 steps of global batch 4. A
    fine-tune of a package (with its own LoRA, merged as render merges it) and new adapters, built
    by the DiT task partitioned, equals the unpartitioned one (new adapters B = 0).
    ZeRO-3 is built partitioned (half the parameters per rank from construction on), steps its
    own fp32 partition (no master copy), and every stage trains the same weights. Elastic resume: run a (2 workers)
    checkpoints at step 2; run b resumes it on 1 worker (2 micro-batches), checkpoints at step 3;
    run c resumes that on 2 workers: both end with a's weights, AdamW moments, EMA, optimizer
    step and LR, bit for bit."""
    from t2v.train.checkpoint import read_whole
    from tests.ranks import run_ranks

    script = tmp_path / "zero.py"
    script.write_text(ZERO_SCRIPT)
    run_ranks(script, 2, tmp_path, env={**os.environ, "DS_ACCELERATOR": "cpu"}, timeout=600)

    def final(name: str, phase: str) -> tuple[dict, dict]:
        d = tmp_path / name / f"{phase}-final"
        return ({k: read_whole(d, k) for k in ("param", "exp_avg", "exp_avg_sq", "ema")},
                json.loads((d / "trainer.json").read_text()))

    assert json.loads((tmp_path / "lora.json").read_text()) == {"same": True, "loaded": True,
                                                                 "b_zero": True}
    ref, ref_meta = final("z2", "a")
    total = ref_meta["held"]
    assert total == sum(v.numel() for v in ref["param"].values()) > 900_000
    assert ref_meta["step"] == ref_meta["optimizer_step"] == ref_meta["ema_updates"] == 4
    assert any(v.abs().max() > 0 for v in ref["exp_avg"].values())  # it really trained
    for name in ("z0", "z2", "z3"):
        got_a, meta_a = final(name, "a")
        if name == "z3":
            assert meta_a["held"] <= total // 2 + 4096  # + each parameter's padding
            assert meta_a["shared"] and all(meta_a["shared"])  # no fp32 master copy
        for kind, tensors in got_a.items():  # every stage trains the same model
            for k, v in tensors.items():
                torch.testing.assert_close(v, ref[kind][k], rtol=1e-5, atol=1e-7, msg=k)
        for phase in ("b", "c"):  # 2 -> 1 -> 2 workers, exactly
            got, meta = final(name, phase)
            assert {k: meta[k] for k in ("step", "optimizer_step", "ema_updates", "lr")} == {
                k: meta_a[k] for k in ("step", "optimizer_step", "ema_updates", "lr")}
            for kind, tensors in got.items():
                assert all(torch.equal(v, got_a[kind][k]) for k, v in tensors.items()), (
                    name, phase, kind)


BF16_SCRIPT = textwrap.dedent("""
    import json, os, sys, tempfile, torch, torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    dist.init_process_group("gloo")
    from t2v.config import TrainConfig
    from t2v.models.dit import VideoDiT, dit_config
    from t2v.train import checkpoint, zero
    from t2v.train.schedule import EMA
    from t2v.train.worker import deepspeed_config, initialize_engine
    geo, out = dit_config("debug", in_channels=4, text_dim=16), {}
    def engine(stage):
        ds = deepspeed_config(TrainConfig(batch_size=2, zero_stage=stage), True)
        torch.manual_seed(0)
        model = zero.build_model(lambda whole: VideoDiT(geo, whole), stage, ds,
                                 torch.device("cpu"))
        eng = initialize_engine(model, torch.optim.AdamW(model.parameters(), lr=1e-3), None, ds,
                                use_gpu=False)
        return eng, EMA(zero.local_fragments(eng.module, 0, 1), 0.9)
    def step(eng, ema, i):
        g = torch.Generator().manual_seed(i)
        x = torch.randn(2, 4, 3, 8, 8, generator=g).bfloat16()
        t, txt = torch.rand(2, generator=g), torch.randn(2, 5, 16, generator=g)
        v = eng(x, t.bfloat16(), txt.bfloat16())
        loss = (v.float() - x.float()).pow(2).mean()
        eng.backward(loss)
        eng.step()
        ema.update(zero.local_fragments(eng.module, 0, 1))
        return float(loss.detach())
    for stage in (0, 2, 3):
        eng, ema = engine(stage)
        for i in range(2):
            step(eng, ema, i)
        d = tempfile.mkdtemp()
        checkpoint.save_state(eng, ema, d, 0, 1)
        saved = checkpoint.trainer_state(eng, ema, zero.full_shapes(eng.module), 2, 8, 1, 1)
        other, other_ema = engine(stage)
        base = getattr(other.optimizer, "optimizer", other.optimizer)
        sched = torch.optim.lr_scheduler.LambdaLR(base, lambda s: 1.0)
        json.dump(saved, open(f"{d}/trainer.json", "w"))
        checkpoint.restore_state(other, other_ema, saved, checkpoint.open_local(d)[1], 0, 1,
                                 sched)
        d2 = tempfile.mkdtemp()
        checkpoint.save_state(other, other_ema, d2, 0, 1)
        json.dump(saved, open(f"{d2}/trainer.json", "w"))
        kinds = ("param", "exp_avg", "exp_avg_sq", "ema")
        first = {k: checkpoint.read_whole(d, k) for k in kinds}
        again = {k: checkpoint.read_whole(d2, k) for k in kinds}
        out[stage] = {"restored_equal": all(torch.equal(first[k][n], again[k][n])
                                            for k in first for n in first[k]),
                      "next_loss": [step(eng, ema, 5), step(other, other_ema, 5)],
                      "module_bf16": next(eng.module.parameters()).dtype == torch.bfloat16}
    print("RESULT" + json.dumps(out))
""")


def test_bf16_checkpoint_restores_weights_moments_and_next_step():
    """bf16 (DeepSpeed's fp32 masters: per parameter at ZeRO-0, flat partitions at 2 and 3): a
    checkpoint restored into a fresh engine holds the same fp32 weights, moments and EMA, and the
    next step's loss is the same."""
    from tests.s3_fixtures import free_port

    r = subprocess.run([sys.executable, "-c", BF16_SCRIPT, str(free_port())], capture_output=True,
                       text=True, timeout=600, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.split("RESULT", 1)[1])
    for stage, got in out.items():
        assert got["restored_equal"] and got["module_bf16"], stage
        assert got["next_loss"][0] == got["next_loss"][1], stage


def test_elastic_accumulation_keeps_the_global_batch():
    from t2v.train.checkpoint import elastic_accum

    saved = {"world": 2, "batch_size": 2, "grad_accum": 1, "configured_grad_accum": 1,
             "global_batch": 4}
    assert elastic_accum(2, 1, None, 3) == (1, None)  # a fresh run
    assert elastic_accum(2, 1, saved, 2) == (1, None)  # same workers, same settings
    accum, note = elastic_accum(2, 1, saved, 1)
    assert accum == 2 and note == ("elastic resume, 2 -> 1 workers: grad_accum 1 -> 2 keeps "
                                   "the global batch at 4")
    # ... and back: the 1-worker checkpoint records accumulation 2, configured 1.
    back = {**saved, "world": 1, "grad_accum": 2}
    assert elastic_accum(2, 1, back, 2) == (1, "elastic resume, 1 -> 2 workers")
    assert elastic_accum(2, 1, back, 1) == (2, "resume: grad_accum 1 -> 2 keeps the global "
                                               "batch at 4")
    assert elastic_accum(2, 1, saved, 3) == (1, "elastic resume, 2 -> 3 workers: global batch "
                                                "4 -> 6 (4 is not a multiple of 2 x 3 workers)")
    # The user changed the batch settings: theirs, and the global batch said when it moves.
    assert elastic_accum(4, 1, saved, 1) == (1, "elastic resume, 2 -> 1 workers")
    assert elastic_accum(2, 3, saved, 2) == (3, "resume: batch settings changed, global batch "
                                                "4 -> 12")
    # Sequence parallelism: the data-parallel groups (world / sequence_parallel) read different
    # samples, so they set the global batch. 4 workers in 2 groups of 2 -> 2 plain workers
    # (still 2 data-parallel) keep the accumulation; -> 1 group of 2 doubles it.
    sp = {**saved, "world": 4, "data_parallel": 2}
    assert elastic_accum(2, 1, sp, 2) == (1, "elastic resume, 4 -> 2 workers, data-parallel "
                                             "2 -> 2")
    assert elastic_accum(2, 1, sp, 2, 1) == (2, "elastic resume, 4 -> 2 workers, data-parallel "
                                                "2 -> 1: grad_accum 1 -> 2 keeps the global "
                                                "batch at 4")
    assert elastic_accum(2, 1, sp, 4, 2) == (1, None)  # the same layout


def test_per_sample_randomness_depends_only_on_seed_step_key():
    a = per_sample_generators(0, 3, ["x", "y"])
    b = per_sample_generators(0, 3, ["y"])
    assert torch.equal(torch.randn(4, generator=a[1]), torch.randn(4, generator=b[0]))
    assert sample_seed(0, 3, "x") != sample_seed(0, 4, "x") != sample_seed(1, 3, "x")


def test_alternative_captions_drawn_per_sample_at_the_asked_rate():
    """alt_caption_prob: each sample trains on one of the alternatives it has (never a padded
    slot) with probability p, uniformly among them, the choice a function of (seed, step, key):
    the same sample gets the same caption in a smaller batch, whatever its neighbours."""
    from t2v.train.dit_task import alternative_captions

    b, k, L, D = 400, 3, 5, 2
    text = torch.zeros(b, L, D)  # the caption: 0; alternative j of sample i: 1 + j
    mask = torch.ones(b, L, dtype=torch.bool)
    alt_text = (1 + torch.arange(k, dtype=torch.float32))[None, :, None, None].expand(b, k, L, D)
    alt_mask = torch.zeros(b, k, L, dtype=torch.bool)
    have = torch.arange(b) % 4  # samples with 0, 1, 2, 3 alternatives
    for i in range(b):
        alt_mask[i, :have[i], :3] = True
    keys = [f"k{i}" for i in range(b)]

    def chosen(prob: float, idx: list[int]) -> list[float]:
        out, _, used = alternative_captions(text[idx], mask[idx], alt_text[idx], alt_mask[idx],
                                            per_sample_generators(0, 7, [keys[i] for i in idx]),
                                            prob)
        assert used == sum(float(row[0, 0]) > 0 for row in out)
        for row in out:  # the whole row is one caption's
            assert row.unique().numel() == 1
        return [float(row[0, 0]) for row in out]

    everyone = list(range(b))
    assert chosen(0.0, everyone) == [0.0] * b
    always = chosen(1.0, everyone)
    assert all(c == 0 for c, h in zip(always, have, strict=True) if h == 0)  # none to take
    assert all(1 <= c <= h for c, h in zip(always, have, strict=True) if h > 0)  # never padding
    picked = [c for c, h in zip(always, have, strict=True) if h == 3]
    assert {1.0, 2.0, 3.0} == set(picked)  # uniformly among the 3 (100 samples)
    half = chosen(0.5, everyone)
    rate = sum(c > 0 for c, h in zip(half, have, strict=True) if h) / int((have > 0).sum())
    assert 0.4 < rate < 0.6
    assert chosen(0.5, everyone[::7]) == half[::7]  # not the batch: the (seed, step, key)
    out, m, _ = alternative_captions(text[:4], mask[:4], alt_text[:4], alt_mask[:4],
                                     per_sample_generators(0, 7, keys[:4]), 1.0)
    assert torch.equal(m[3], alt_mask[3, int(out[3, 0, 0]) - 1])  # the mask comes along


DS_SCRIPT = textwrap.dedent("""
    import json, os, sys, torch
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    torch.distributed.init_process_group("gloo")
    from t2v.config import TrainConfig
    from t2v.train.worker import deepspeed_config, initialize_engine
    out = {}
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    y = torch.randn(4, 1, generator=torch.Generator().manual_seed(1))
    for name, micro, accum, clip in [("b4", 4, 1, 0.0), ("a2x2", 2, 2, 0.0), ("clip", 4, 1, 0.05)]:
        torch.manual_seed(0)
        model = torch.nn.Linear(5, 1)
        cfg = TrainConfig(batch_size=micro, grad_accum=accum, zero_stage=2,
                          optim={"grad_clip": clip})
        opt = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.9, 0.99), weight_decay=0.0)
        eng = initialize_engine(model, opt, None, deepspeed_config(cfg, False), use_gpu=False)
        opt = eng.optimizer
        # the gradient of the full batch, computed by hand for reference
        ref = torch.nn.Linear(5, 1); ref.load_state_dict(model.state_dict())
        ((ref(x) - y) ** 2).mean().backward()
        g = torch.cat([ref.weight.grad.flatten(), ref.bias.grad.flatten()])
        for i in range(accum):
            sl = slice(i * micro, (i + 1) * micro)
            loss = ((eng(x[sl]) - y[sl]) ** 2).mean()
            eng.backward(loss)
            eng.step()
        st = opt.optimizer.state if hasattr(opt, "optimizer") else opt.state
        m = torch.cat([s["exp_avg"].flatten() for s in st.values()])
        w = torch.cat([p.detach().flatten() for p in eng.module.parameters()])
        out[name] = {"exp_avg": m.tolist(), "grad": g.tolist(), "params": w.tolist(),
                     "gnorm": float(eng.get_global_grad_norm())}
    print("RESULT" + json.dumps(out))
""")


def test_deepspeed_accumulation_and_clipping_match_formulas(tmp_path):
    from tests.s3_fixtures import free_port

    script = tmp_path / "ds_check.py"
    script.write_text(DS_SCRIPT)
    r = subprocess.run([sys.executable, str(script), str(free_port())], capture_output=True,
                       text=True, timeout=600, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.split("RESULT", 1)[1])
    g = torch.tensor(out["b4"]["grad"])
    # Adam's first moment after one step is (1 - beta1) * (the gradient it was given).
    torch.testing.assert_close(torch.tensor(out["b4"]["exp_avg"]), 0.1 * g, rtol=1e-5, atol=1e-7)
    # 2 micro-batches of 2 accumulated == one batch of 4 (same update, same moments).
    torch.testing.assert_close(torch.tensor(out["a2x2"]["exp_avg"]), 0.1 * g, rtol=1e-5,
                               atol=1e-7)
    torch.testing.assert_close(torch.tensor(out["a2x2"]["params"]),
                               torch.tensor(out["b4"]["params"]), rtol=1e-5, atol=1e-6)
    # Clipping: the optimizer saw g * min(1, c / ||g||); the reported norm is pre-clip.
    norm = float(g.norm())
    assert out["clip"]["gnorm"] == pytest.approx(norm, rel=1e-4)
    assert norm > 0.05
    torch.testing.assert_close(torch.tensor(out["clip"]["exp_avg"]), 0.1 * g * (0.05 / norm),
                               rtol=1e-4, atol=1e-7)


def _saved_bytes(model, x_shape: tuple[int, ...], text_len: int) -> int:
    """Bytes autograd keeps for backward in one forward (parameters excluded)."""
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    b = x_shape[0]
    inputs = (torch.randn(*x_shape), torch.rand(b), torch.randn(b, text_len,
              model.config.text_dim), torch.ones(b, text_len, dtype=torch.bool))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(*inputs)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in seen.items() if ptr not in params)


def test_activation_estimate_matches_what_autograd_saves():
    """The dry run's activation formula against the bytes autograd really keeps, on a shape
    (width 192, MLP 768, 108 tokens, 32 text tokens) other than those it was counted on."""
    from t2v.models.dit import VideoDiT, dit_config
    from t2v.train.memory import activation_elements

    cfg = dit_config("debug", dim=192, ffn_dim=768, heads=2, depth=2)
    model = VideoDiT(cfg).train()
    tokens = 3 * 12 * 12 // 4  # latent 3x12x12, patch (1, 2, 2)
    got = _saved_bytes(model, (2, 4, 3, 12, 12), 32)
    assert 4 * 2 * activation_elements(cfg, tokens, 32, False) == pytest.approx(got, rel=0.05)
    model.checkpointing = True  # the forward keeps block inputs; backward recomputes one block
    kept = _saved_bytes(model, (2, 4, 3, 12, 12), 32)
    assert 4 * 2 * cfg.depth * tokens * cfg.dim <= kept
    assert kept < 4 * 2 * activation_elements(cfg, tokens, 32, True) < got


def test_dry_run_per_rank_memory(tmp_path, capsys, monkeypatch):
    """`t2v train --dry-run` for Wan 2.1 1.3B geometry at 81x480x832 (latent 16x21x60x104):
    model states split by ZeRO stage as the formulas say, a verdict against the GPU, no Ray."""
    import json

    from t2v.cli import main
    from t2v.train import trainer
    from t2v.train.memory import GiB

    def no_ray(*_a, **_k):
        raise AssertionError("a dry run started Ray")

    monkeypatch.setattr(trainer, "ensure_ray", no_ray)

    latents = tmp_path / "latents"
    latents.mkdir()
    (latents / "_index.json").write_text(json.dumps({
        "shards": [], "latent_shapes": [[16, 21, 60, 104]], "max_length": 512, "text_dim": 4096}))
    base = ["train", "--dry-run", "stage=dit", "model=large", f"out={tmp_path}/runs",
            f"data.shards={latents}", "vae=unused", "use_gpu=true", "precision=bf16",
            "batch_size=1"]
    runs = {}
    for zero, workers, ckpt in ((0, 8, "true"), (3, 8, "true"), (3, 64, "true"),
                                (3, 8, "false")):
        assert main([*base, f"zero_stage={zero}", f"num_workers={workers}",
                     f"activation_checkpointing={ckpt}"]) == 0
        out = capsys.readouterr().out
        runs[zero, workers, ckpt] = json.loads(out[out.index("{"):])
        assert "per rank:" in out and "verdict" in out
    z0, z3, z3_64 = runs[0, 8, "true"], runs[3, 8, "true"], runs[3, 64, "true"]
    p = z0["params"]
    assert 1.3e9 < p < 1.5e9 and z0["tokens"] == 21 * 30 * 52
    assert (z0["weights"], z0["gradients"], z0["optimizer"]) == (2 * p, 2 * p, 12 * p)
    assert (z3["weights"], z3["gradients"], z3["optimizer"]) == (2 * p // 8, 2 * p // 8,
                                                                   12 * p // 8)
    assert z3_64["optimizer"] == 12 * p // 64 and z3["ema"] == z0["ema"] == 4 * p // 8
    assert z0["per_rank_gib"] > z3["per_rank_gib"] > z3_64["per_rank_gib"]
    assert z3["activations"] / GiB == pytest.approx(6.2, abs=0.5)  # checkpointed, bf16
    # Without activation checkpointing 30 blocks keep ~100 GiB: no 80 GiB GPU holds that.
    assert z0["fits"] is True and runs[3, 8, "false"]["fits"] is False
    assert runs[3, 8, "false"]["activations"] > 80 * GiB
    # Sequence parallelism 4: each rank keeps a quarter of the 32,760 tokens (8,190 each),
    # whatever the block count: without checkpointing it fits again; states are as before.
    assert main([*base, "zero_stage=3", "num_workers=8", "activation_checkpointing=false",
                 "sequence_parallel=4"]) == 0
    out = capsys.readouterr().out
    sp4 = json.loads(out[out.index("{"):])
    from t2v.models.dit import dit_config
    from t2v.train.memory import activation_elements

    assert sp4["activations"] == 2 * activation_elements(dit_config("large", text_dim=4096),
                                                         8190, 512, False)
    assert sp4["optimizer"] == z3["optimizer"] and sp4["fits"] is True


def assert_refused_before_ray(base: list[str], cases: dict[tuple[str, ...], str], capsys,
                              monkeypatch) -> None:
    """`t2v` + base + each case's args exits 2 with one line ending in its message, and never
    starts Ray."""
    from t2v.cli import main
    from t2v.train import trainer

    def no_ray(*_a, **_k):
        raise AssertionError("started Ray")

    monkeypatch.setattr(trainer, "ensure_ray", no_ray)
    for args, message in cases.items():
        assert main([*base, *args]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].endswith(message), (args, err)


def test_sequence_parallel_refusals_are_one_line(tmp_path, capsys, monkeypatch):
    """What sequence parallelism cannot run is refused before Ray starts, in one line each."""
    (tmp_path / "shards").mkdir()
    base = ["train", f"out={tmp_path}/runs", f"data.shards={tmp_path}/shards", "vae=unused"]
    cases = {
        ("num_workers=3", "sequence_parallel=2"):
            "num_workers: Value error, sequence_parallel=2 needs a fixed num_workers that it "
            "divides (got 3)",
        ("num_workers=[2,4]", "sequence_parallel=2"):
            "num_workers: Value error, sequence_parallel=2 needs a fixed num_workers that it "
            "divides (got [2, 4])",
        ("stage=vae", "num_workers=2", "sequence_parallel=2"):
            "sequence_parallel=2 needs stage dit (got stage vae)",
        ("model=debug", "num_workers=4", "sequence_parallel=4"):
            "sequence_parallel=4 must divide the 2 attention heads of model debug",
    }
    assert_refused_before_ray(base, cases, capsys, monkeypatch)


def test_compile_refusals_are_one_line(tmp_path, capsys, monkeypatch):
    """What train.compile cannot run is refused before Ray starts, in one line each: the VAE,
    ZeRO-3 and sequence parallelism, and a CPU run without a C++ compiler."""
    from t2v.train import dit_task

    (tmp_path / "shards").mkdir()
    base = ["train", f"out={tmp_path}/runs", f"data.shards={tmp_path}/shards", "vae=unused",
            "compile=true"]
    cases = {
        ("stage=vae",): "compile=true is for stage dit (got stage vae: its step is mostly "
                        "convolutions, which compiling does not speed up)",
        ("zero_stage=3",): "compile=true needs zero_stage <= 2 and sequence_parallel 1 (got "
                           "zero_stage 3, sequence_parallel 1): ZeRO-3's gathers and the "
                           "all-to-alls run outside compiled blocks",
        ("num_workers=2", "sequence_parallel=2"):
            "compile=true needs zero_stage <= 2 and sequence_parallel 1 (got zero_stage 2, "
            "sequence_parallel 2): ZeRO-3's gathers and the all-to-alls run outside compiled "
            "blocks",
    }
    assert_refused_before_ray(base, cases, capsys, monkeypatch)
    monkeypatch.setattr(dit_task, "cpp_compiler", lambda: None)
    assert_refused_before_ray(base, {(): "compile=true on a CPU needs a C++ compiler (g++, or "
                                         "set $CXX; Debian: apt install g++), or set "
                                         "compile=false"}, capsys, monkeypatch)


def test_bad_run_inputs_fail_before_ray_and_write_nothing(tmp_path, capsys, monkeypatch):
    """A run name that would leave RUNS, and a data folder without shards: one line each,
    before Ray starts, and nothing written under RUNS (config.yaml used to be written first)."""
    from t2v.cli import main
    from t2v.train import trainer

    def no_ray(*_a, **_k):
        raise AssertionError("started Ray")

    monkeypatch.setattr(trainer, "ensure_ray", no_ray)
    (tmp_path / "empty").mkdir()
    runs = tmp_path / "runs"
    base = ["train", f"out={runs}", f"data.shards={tmp_path}/empty", "vae=unused"]
    for args, message in (
            (["name=../../escaped"], "name: String should match pattern"),
            (["name=.hidden"], "name: String should match pattern"),
            (["name=ok"], f"{tmp_path}/empty: no shard-*.tar found")):
        assert main([*base, *args]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (args, err)
    assert not runs.exists() and not (tmp_path / "escaped").exists()


def test_a_pass_is_checked_against_the_index(tmp_path, capsys):
    """The rows of a pass are counted (a short last batch too, then dropped as drop_last
    would) and compared with what the index lists: more missing than Ray's equal splits drop is
    recorded and said."""
    import json
    from types import SimpleNamespace

    from t2v.config import TrainConfig
    from t2v.train.monitor import Monitor
    from t2v.train.task import DataInfo
    from t2v.train.worker import CountedBatches

    batches = [SimpleNamespace(keys=["a"] * n) for n in (2, 2, 1)]
    counted = CountedBatches(batches, 2)
    assert [len(b.keys) for b in counted] == [2, 2] and counted.rows == 5
    info = DataInfo(frames=9, height=32, width=32, fps=8.0, tokens_per_sample=1,
                    train_flops_per_sample=1.0, train_samples=10)
    monitor = Monitor(TrainConfig(), info, str(tmp_path), rank=0, world=1)
    monitor.pass_done(3, 10)
    monitor.pass_done(6, 7)
    monitor.pass_done(12, 19, passes=2)  # one read of two passes: twice the index
    monitor.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [
        {"event": "pass", "step": 3, "rows": 10, "index_rows": 10, "missing": 0, "passes": 1},
        {"event": "pass", "step": 6, "rows": 7, "index_rows": 10, "missing": 3, "passes": 1},
        {"event": "pass", "step": 12, "rows": 19, "index_rows": 20, "missing": 1, "passes": 2}]
    out = capsys.readouterr().out
    assert "the pass ending at step 6 read 7 of the 10 training samples the index lists: " \
           "3 missing" in out and "step 3" not in out


def test_data_position_is_exact_with_the_same_split_and_counts_samples_with_another():
    from t2v.train import checkpoint

    saved = {"step": 6, "world": 2, "data_parallel": 2, "batch_size": 2,
             "data": {"pass": 1, "batches": 3}}  # 3 micro-batches of 2 on each of 2 replicas
    assert checkpoint.data_position(saved, 2, 2) == (1, 3, None)
    pass_index, skip, note = checkpoint.data_position(saved, 2, 1)  # 12 samples, 1 replica
    assert (pass_index, skip) == (1, 6) and "not the same ones" in note
    assert checkpoint.data_position(saved, 4, 2)[:2] == (1, 1)  # 12 samples // 8 a micro-batch
    assert checkpoint.data_position(None, 2, 2) == (0, 0, None)
    before = {k: v for k, v in saved.items() if k != "data"}  # a checkpoint from before
    assert checkpoint.data_position(before, 2, 2)[:2] == (0, 0)


def test_vae_crop_windows_are_per_clip_slices_and_bad_crops_are_refused(tmp_path, capsys,
                                                                        monkeypatch):
    """`data.crop`: each clip's window is a slice of that clip, placed by its own (seed, step,
    key) generator (another step moves it, the same step repeats it); windows that the VAE cannot
    run, or stage dit, are refused in one line before Ray starts."""
    from t2v.train.vae_task import crop_windows

    x = torch.arange(2 * 3 * 9 * 32 * 32, dtype=torch.float32).view(2, 3, 9, 32, 32)
    keys = ["a", "b"]
    got = crop_windows(x, 5, 16, per_sample_generators(0, 7, keys, "vae-crop"))
    assert got.shape == (2, 3, 5, 16, 16)
    for clip, window in zip(x, got, strict=True):  # the value at [0, 0, 0, 0] locates it
        t0, rest = divmod(int(window[0, 0, 0, 0]) % (9 * 32 * 32), 32 * 32)
        y0, x0 = divmod(rest, 32)
        assert torch.equal(window, clip[:, t0:t0 + 5, y0:y0 + 16, x0:x0 + 16])
    again = crop_windows(x, 5, 16, per_sample_generators(0, 7, keys, "vae-crop"))
    assert torch.equal(got, again)
    moved = [crop_windows(x, 5, 16, per_sample_generators(0, s, keys, "vae-crop"))
             for s in range(8, 12)]
    assert any(not torch.equal(got, m) for m in moved)
    with pytest.raises(ValueError, match="cannot cut 2 windows of 11x16x16"):
        crop_windows(x, 11, 16, per_sample_generators(0, 7, keys))

    (tmp_path / "shards").mkdir()
    base = ["train", f"out={tmp_path}/runs", f"data.shards={tmp_path}/shards"]
    cases = {
        ("stage=vae", "data.crop=[8,16]"):
            "data.crop=[8, 16]: the VAE needs 1 + k x 4 frames and a multiple of 4 pixels "
            "(e.g. [5, 16])",
        ("stage=vae", "data.crop=[5,18]"):
            "data.crop=[5, 18]: the VAE needs 1 + k x 4 frames and a multiple of 4 pixels "
            "(e.g. [5, 16])",
        ("stage=vae", "data.crop=[5]"):
            "data.crop: Value error, crop must be [frames, side] with frames >= 1 and side >= 2 "
            "(got [5])",
        ("stage=dit", "vae=unused", "data.crop=[5,16]"):
            "data.crop=[5, 16] is for stage vae (the DiT trains on whole clips' latents)",
    }
    assert_refused_before_ray(base, cases, capsys, monkeypatch)


def test_a_local_ray_runs_without_the_preemption_watcher_unless_the_user_says(
        monkeypatch) -> None:
    """A Ray t2v starts on one machine has no spot node to lose: Ray Train's PreemptionWatcher
    is off there (its process wakes ~150 times a second beside the workers); a user's own
    setting is kept, and leaving that Ray takes the setting back (Ray Train hands the driver's
    variables to every later run, one on a cluster joined afterwards too)."""
    import ray

    from t2v import runtime
    from t2v.runtime import local_ray_defaults

    name = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
    monkeypatch.delenv(name, raising=False)  # the suite's own cluster sets it
    monkeypatch.setattr(ray, "shutdown", lambda: None)  # keep this process's connection
    monkeypatch.setattr(runtime, "_LOCAL_SET", runtime.local_ray_defaults(os.environ))
    assert os.environ[name] == "0"
    runtime.disconnect_ray()
    assert name not in os.environ and runtime._LOCAL_SET == []

    env: dict[str, str] = {}
    assert local_ray_defaults(env) == ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"]
    assert env == {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    env = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1"}
    assert local_ray_defaults(env) == []
    assert env == {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1"}


def test_vae_stage_loss_weighs_its_terms_as_configured():
    """Stage vae's loss is the VAE's own loss with the run's weights (l1, mse, edge, scale, kl)
    and the posterior noise drawn from (seed, step, keys): a run with other weights trains on
    another objective, the same run on the same step repeats its value."""
    from t2v.config import TrainConfig
    from t2v.data.collate import VideoBatch
    from t2v.models.vae import CausalVideoVAE, vae_config
    from t2v.train.vae_task import VAETask

    torch.manual_seed(0)
    vae = CausalVideoVAE(vae_config("debug", latent_channels=6, shortcut=True))

    class Engine(torch.nn.Module):  # what DeepSpeed's engine is to the task: .module + call
        def __init__(self) -> None:
            super().__init__()
            self.module = vae

        def forward(self, x, generator=None):  # noqa: ANN001, ANN201
            return self.module(x, generator=generator)

    x = torch.rand(2, 3, 5, 16, 16) * 2 - 1
    batch = VideoBatch(video=x, captions=["", ""], keys=["a", "b"], meta=[{}, {}])
    weights = dict(l1_weight=0.5, mse_weight=4.0, edge_weight=1.0, scale_weight=0.25,
                   kl_weight=1e-3)
    task = VAETask(TrainConfig(stage="vae", seed=3, **weights))
    got = task.loss(Engine(), batch, step=5)
    seed = sample_seed(3, 5, "a,b", "vae-posterior")
    recon, post = vae(x, generator=torch.Generator().manual_seed(seed))
    want = vae.loss(x, recon, post, **weights)["total"]
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    assert float(task.loss(Engine(), batch, step=5)) == pytest.approx(float(got), rel=1e-6)
    plain = VAETask(TrainConfig(stage="vae", seed=3, edge_weight=1.0, scale_weight=0.25,
                                kl_weight=1e-3)).loss(Engine(), batch, step=5)
    terms = vae.loss(x, recon, post, **weights)
    assert float(got) - float(plain) == pytest.approx(
        -0.5 * float(terms["l1"]) + 3.0 * float(terms["mse"]), rel=1e-4)
