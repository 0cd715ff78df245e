"""The training loop: determinism, exact resume, dead latents and revival, USAE update rules, logs."""

import dataclasses
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save

from sparc.data.planted import PlantedConfig, make_planted
from sparc.model import sae
from sparc.params import TrainParams
from sparc.train import fused, loop
from sparc.train.checkpoint import latest_checkpoint
from sparc.train.live import MemoryLogger
from sparc.train.loop import (
    USAE_METHODS,
    Trainer,
    TrainSpec,
    evaluate_loss,
    metric_name,
    train_arrays,
    train_sae,
)
from sparc.train.sampler import USAE_SOURCE, FeatureSource, counter_rng

DATA = make_planted(
    PlantedConfig(dims={"a": 12, "b": 10, "c": 8}, n_samples=256, n_parents=2, n_children=3, world_dim=8)
)
STREAMS = ["a", "b", "c"]


def make_spec(method="sparc", topk=None, lam=1.0, seed=0, L=32, k=3, **train) -> TrainSpec:
    """A small spec; ``topk`` defaults to the method's rule (USAE: local, SPARC: global)."""
    base = dict(
        batch_size=64, epochs=4, lr=3.0e-3, k_aux=8, dead_steps=5, revive_every=4,
        checkpoint_every=5, log_every=3, device="cpu",
    )
    base.update(train)
    topk = topk or ("local" if method in USAE_METHODS else "global")
    return TrainSpec(L=L, k=k, lam=lam, topk=topk, method=method, seed=seed, train=TrainParams(**base))


def weights(model) -> bytes:
    return save({k: v.contiguous() for k, v in model.state_dict().items()})


class Stop(Exception):
    pass


def stop_at(step_to_stop):
    def callback(step, model):
        if step == step_to_stop:
            raise Stop

    return callback


def test_steps_logs_and_loss_decrease():
    log = MemoryLogger()
    res = train_arrays(DATA.features, make_spec(epochs=8), logger=log)
    assert res.finished and res.total_steps == res.step == 32  # 4 steps per epoch
    assert [s for s, _ in log.history] == [3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 32]
    assert log.history == res.history
    m = res.metrics
    for name in ("loss/total", "loss/self", "loss/cross", "loss/aux", "self_nmse/a", "cross_nmse/a_to_b",
                 "l0/c", "dead_fraction/b", "active_fraction/a", "epoch"):
        assert name in m
    assert m["epoch"] == 8.0
    assert 0 < m["l0/a"] <= 3
    assert m["loss/total"] < 0.8 * log.history[0][1]["loss/total"]
    assert m["loss/total"] == pytest.approx(m["loss/self"] + m["loss/cross"] + m["loss/aux"] / 32, rel=1e-5)


def test_same_seed_gives_identical_bytes_and_other_seed_differs():
    a = train_arrays(DATA.features, make_spec())
    b = train_arrays(DATA.features, make_spec())
    c = train_arrays(DATA.features, make_spec(seed=1))
    assert weights(a.model) == weights(b.model)
    assert a.history == b.history
    assert weights(a.model) != weights(c.model)


@pytest.mark.parametrize(
    "spec",
    [make_spec(), make_spec(method="usae", usae_update="source_only"), make_spec(topk="local", lam=0.0),
     make_spec(method="usae_paper", usae_update="source_only"), make_spec(subset_keep=0.5, consistency=0.5)],
    ids=["sparc", "usae-source-only", "local-lam0", "usae-paper", "subset-consistency"],
)
def test_resume_after_interruption_equals_uninterrupted_run(tmp_path, spec):
    full_log = MemoryLogger()
    full = train_arrays(DATA.features, spec, logger=full_log)

    run = tmp_path / "run"
    with pytest.raises(Stop):  # crash after step 13; the last checkpoint is step 10
        train_arrays(DATA.features, spec, checkpoint_dir=run, callback=stop_at(13))
    assert latest_checkpoint(run).name == "step-00000010"
    log = MemoryLogger()
    resumed = train_arrays(DATA.features, spec, checkpoint_dir=run, logger=log)
    assert resumed.finished
    assert weights(resumed.model) == weights(full.model)
    assert log.history == full_log.history  # replayed history + new logs = the uninterrupted logs


def test_max_steps_splits_a_run_exactly(tmp_path):
    spec = make_spec()
    full = train_arrays(DATA.features, spec)
    run = tmp_path / "run"
    part = train_arrays(DATA.features, spec, checkpoint_dir=run, max_steps=7)
    assert not part.finished and part.step == 7 and part.checkpoint.name == "step-00000007"
    again = train_arrays(DATA.features, spec, checkpoint_dir=run, max_steps=7)  # nothing left to do
    assert again.step == 7 and again.checkpoint == part.checkpoint
    rest = train_arrays(DATA.features, spec, checkpoint_dir=run)
    assert rest.finished and weights(rest.model) == weights(full.model)


def test_resume_rejects_other_dims_and_other_params(tmp_path):
    run = tmp_path / "run"
    train_arrays(DATA.features, make_spec(), checkpoint_dir=run, max_steps=3)
    other = dict(DATA.features, b=np.zeros((256, 11), np.float32) + 1)
    with pytest.raises(ValueError, match="stream b has dim 10 in the checkpoint but 11 in the features"):
        train_arrays(other, make_spec(), checkpoint_dir=run)
    with pytest.raises(ValueError, match="other training parameters"):
        train_arrays(DATA.features, make_spec(lr=1.0e-2), checkpoint_dir=run)


def test_dead_counters_change_only_in_training_steps():
    spec = make_spec()
    source = FeatureSource(DATA.features)
    trainer = Trainer(source, spec, torch.device("cpu"))
    trainer.train_step()
    before = {s: c.clone() for s, c in trainer.since.items()}
    evaluate_loss(trainer.model, source, spec)
    assert all(torch.equal(before[s], trainer.since[s]) for s in STREAMS)
    trainer.train_step()
    for s in STREAMS:  # +1 for latents that did not fire, 0 for those that did
        assert torch.all((trainer.since[s] == before[s] + 1) | (trainer.since[s] == 0))
        assert (trainer.since[s] == 0).any()


def test_revival_resets_encoder_rows_adam_moments_and_counters():
    spec = make_spec(revive_every=1000, dead_steps=5)
    trainer = Trainer(FeatureSource(DATA.features), spec, torch.device("cpu"))
    for _ in range(3):
        trainer.train_step()
    W, b = trainer.model.W_enc["a"], trainer.model.b_lat["a"]
    dead = torch.tensor([0, 5, 7])
    trainer.since["a"][dead] = 100
    trainer.since["b"][dead] = 3  # not dead long enough
    st = trainer.optimizer.state[W]
    assert st["exp_avg_sq"][dead].abs().sum() > 0
    other_rows = st["exp_avg"][1].clone()
    trainer.revive()
    assert torch.all(trainer.since["a"][dead] == 0) and torch.all(trainer.since["b"][dead] == 3)
    assert torch.all(st["exp_avg"][dead] == 0) and torch.all(st["exp_avg_sq"][dead] == 0)
    assert torch.all(trainer.optimizer.state[b]["exp_avg"][dead] == 0) and torch.all(b[dead] == 0)
    assert torch.equal(st["exp_avg"][1], other_rows)
    assert torch.linalg.vector_norm(W[dead], dim=1).max() < 0.05  # small noise


def test_aux_term_gets_the_dead_masks():
    """With many latents and k = 1 most latents never fire: once they count as dead the AuxK term
    is non-zero; with dead_steps larger than the run it stays zero."""
    with_dead = train_arrays(DATA.features, make_spec(L=64, k=1, dead_steps=2, revive_every=1000))
    never = train_arrays(DATA.features, make_spec(L=64, k=1, dead_steps=10_000))
    assert with_dead.metrics["loss/aux"] > 0 and with_dead.metrics["dead_fraction/a"] > 0.2
    assert all(m["loss/aux"] == 0 for _, m in never.history)


@pytest.mark.parametrize("method", USAE_METHODS)
@pytest.mark.parametrize("rule", ["source_only", "joint"])
def test_usae_update_rules(rule, method):
    spec = make_spec(method=method, usae_update=rule)
    trainer = Trainer(FeatureSource(DATA.features), spec, torch.device("cpu"))
    before = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    trainer.train_step()
    src = STREAMS[int(counter_rng(spec.seed, USAE_SOURCE, 0).integers(3))]
    after = trainer.model.state_dict()
    # normalise_decoder touches every row within rounding; "changed" means a real update
    changed = {k for k in before if (before[k] - after[k]).abs().max() > 1e-5}
    own = [f"b_pre.{src}"] if method == "usae" else [f"bn.{src}.weight", f"bn.{src}.running_mean"]
    assert {f"W_enc.{src}", f"W_dec.{src}", *own} <= changed
    others = [s for s in STREAMS if s != src]
    assert not any(k.startswith((f"W_enc.{o}", f"bn.{o}.")) for o in others for k in changed)  # never encoded
    decoders_of_others = {f"W_dec.{o}" for o in others}
    if rule == "source_only":
        assert not decoders_of_others & changed
    else:
        assert decoders_of_others <= changed


def test_spec_checks_and_max_steps():
    with pytest.raises(ValueError, match="train.lr"):
        make_spec(lr=0.0).check()
    for method in USAE_METHODS:
        with pytest.raises(ValueError, match="so topk must be local"):
            make_spec(method=method, topk="global").check()
    with pytest.raises(ValueError, match="k: must be at most L"):
        make_spec(k=40).check()
    with pytest.raises(ValueError, match="max_steps"):
        train_arrays(DATA.features, make_spec(), max_steps=0)
    assert dataclasses.asdict(make_spec())["train"]["device"] == "cpu"
    assert "device" not in make_spec().key_payload()["train"]


def test_metric_names():
    assert metric_name("self_nmse") == "loss/self"
    assert metric_name("aux") == "loss/aux"
    assert metric_name("cross_nmse/a->b") == "cross_nmse/a_to_b"
    assert metric_name("l0/a") == "l0/a"


def test_train_sae_rejects_a_source_on_another_device():
    source = FeatureSource(DATA.features, device="meta")
    with pytest.raises(ValueError, match="feature source yields tensors on meta"):
        train_sae(source, make_spec())


@pytest.mark.parametrize("method", ["sparc", "usae", "usae_paper"])
def test_no_host_reads_in_a_plain_step(monkeypatch, method):
    """Between logs and revivals the training loop's own code reads no tensor value on the host
    (the model's CPU kernels may; on accelerators they do not, see sparc.model). The loop as it
    runs on accelerators: the fused step (CPU only, numpy throughout) is switched off."""
    monkeypatch.setattr(fused, "FUSED", False)
    trainer = Trainer(FeatureSource(DATA.features), make_spec(method=method, revive_every=1000), torch.device("cpu"))
    trainer.train_step()
    read = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "numpy", "cpu"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if "sparc/train/" in caller.replace("\\", "/") or caller == __file__:
                read.append((_name, caller))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    torch.zeros(()).item()
    assert read == [("item", __file__)]  # the spy sees host reads made from here
    read.clear()
    for _ in range(3):
        trainer.train_step()
    monkeypatch.undo()
    assert read == []
    trainer.collect_metrics()  # a log does read (once)


def test_usae_lambda_weights_the_cross_terms():
    one = train_arrays(DATA.features, make_spec(method="usae", epochs=2))
    zero = train_arrays(DATA.features, make_spec(method="usae", epochs=2, lam=0.0))
    assert weights(one.model) != weights(zero.model)
    assert zero.metrics["loss/cross"] > one.metrics["loss/cross"]


def test_usae_paper_trains_deterministically_and_its_counters_count_global_steps():
    log = MemoryLogger()
    res = train_arrays(DATA.features, make_spec(method="usae_paper", epochs=8), logger=log)
    again = train_arrays(DATA.features, make_spec(method="usae_paper", epochs=8))
    assert weights(res.model) == weights(again.model) and res.history == again.history  # buffers included
    first, last = log.history[0][1], res.metrics
    # L1 + aux falls more slowly than the NMSE objectives of the other methods on this tiny problem
    assert last["loss/total"] < 0.9 * first["loss/total"]
    assert last["loss/self"] < 0.75 * first["loss/self"] and last["loss/cross"] < 0.85 * first["loss/cross"]
    assert "loss/l1" in last and "loss/aux" in last
    assert all(0 < v <= 3 for k, v in last.items() if k.startswith("l0/"))
    assert res.model.cfg.encoder == "batchnorm"

    trainers = {m: Trainer(FeatureSource(DATA.features), make_spec(method=m), torch.device("cpu"))
                for m in ("usae", "usae_paper")}
    for trainer in trainers.values():
        trainer.train_step()
    src = STREAMS[int(counter_rng(0, USAE_SOURCE, 0).integers(3))]
    for s in STREAMS:
        if s == src:
            continue
        assert torch.all(trainers["usae_paper"].since[s] == 1)  # a global step passed for every stream
        assert torch.all(trainers["usae"].since[s] == 0)  # only the source's counters move


def test_evaluate_loss_uses_running_statistics_and_keeps_the_mode():
    trainer = Trainer(FeatureSource(DATA.features), make_spec(method="usae_paper"), torch.device("cpu"))
    for _ in range(3):
        trainer.train_step()
    model = trainer.model
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    metrics = evaluate_loss(model, FeatureSource(DATA.features), trainer.spec)
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())
    assert metrics["loss/total"] > 0 and "cross_nmse/a_to_b" in metrics


def test_alignment_options_change_training_and_reduce_to_local_topk_for_one_stream(monkeypatch):
    plain = train_arrays(DATA.features, make_spec(epochs=2))
    subset = train_arrays(DATA.features, make_spec(epochs=2, subset_keep=0.5))
    consistent = train_arrays(DATA.features, make_spec(epochs=2, consistency=1.0))
    assert weights(subset.model) != weights(plain.model)
    assert weights(consistent.model) != weights(plain.model)
    assert "loss/consistency" in consistent.metrics and "loss/consistency" not in plain.metrics
    assert subset.model.cfg == plain.model.cfg  # inference keeps Global TopK over the streams given
    one = {"a": DATA.features["a"]}
    monkeypatch.setattr(fused, "FUSED", False)  # bit for bit: the stream-subset option's (autograd) path
    alone = train_arrays(one, make_spec(epochs=2, topk="local"))
    assert weights(train_arrays(one, make_spec(epochs=2, subset_keep=0.3)).model) == weights(alone.model)


def test_decoder_normalise_order(monkeypatch):
    """after_step (ours) leaves unit decoder rows after every step; before_step (the SPARC
    reference's order) renormalises before the step, so the rows end off the unit sphere and the
    run differs slightly."""
    ours = train_arrays(DATA.features, make_spec(epochs=2))
    monkeypatch.setattr(loop, "DECODER_NORMALISE", "before_step")
    ref = train_arrays(DATA.features, make_spec(epochs=2))
    for s in STREAMS:
        norms, ref_norms = (torch.linalg.vector_norm(m.model.W_dec[s], dim=1) for m in (ours, ref))
        torch.testing.assert_close(norms, torch.ones_like(norms))
        assert (ref_norms - 1).abs().max() > 1e-6
        torch.testing.assert_close(ref_norms, torch.ones_like(norms), atol=0.05, rtol=0)
    assert ours.metrics["loss/total"] == pytest.approx(ref.metrics["loss/total"], rel=0.05)


@pytest.mark.parametrize(("method", "topk", "fused_on"), [("sparc", "global", True), ("sparc", "local", True),
                                                       ("sparc", "global", False), ("sparc", "local", False),
                                                       ("usae", "local", False)])
def test_skipping_auxk_without_dead_latents_is_bit_identical(monkeypatch, method, topk, fused_on):
    """Streams without dead latents get no mask (every step up to dead_steps): weights and logged
    history (aux/<s> at 0 included) equal those of passing the all-False masks, in the fused step
    and on the autograd path, at a size where the latter's CPU kernels take the pooled MKL CSR
    path ([8192, 256] float32 gradients: 8 MiB)."""
    gen = np.random.default_rng(0)
    feats = {s: gen.standard_normal((128, d)).astype(np.float32) for s, d in {"a": 256, "b": 96, "c": 64}.items()}
    spec = make_spec(method=method, topk=topk, L=8192, k=16, batch_size=64, epochs=6, dead_steps=2,
                     revive_every=10**6)
    runs, selections = {}, {}
    for skip in (False, True):
        monkeypatch.setattr(loop, "SKIP_EMPTY_AUXK", skip)
        monkeypatch.setattr(fused, "FUSED", fused_on)
        calls = []
        monkeypatch.setattr(sae, "aux_topk", lambda *a, f=sae.aux_topk, calls=calls: calls.append(1) or f(*a))
        monkeypatch.setattr(fused, "fused_step", lambda *a, f=fused.fused_step, calls=calls: calls.extend([1] * len(a[4])) or f(*a))  # masks passed
        runs[skip] = train_arrays(feats, spec)
        selections[skip] = len(calls)
        monkeypatch.undo()
    assert 0 < selections[True] < selections[False]  # the first dead_steps + 1 steps select nothing
    assert weights(runs[True].model) == weights(runs[False].model)
    assert runs[True].history == runs[False].history
    assert any(m["loss/aux"] > 0 for _, m in runs[True].history)  # the later steps have dead latents


def test_none_dead_streams():
    trainer = Trainer(FeatureSource(DATA.features), make_spec(dead_steps=5), torch.device("cpu"))
    dead = {s: trainer.since[s] > 5 for s in STREAMS}
    assert trainer.none_dead(dead) == set(STREAMS)  # step 0 <= dead_steps: no counter can exceed it
    trainer.step = 6
    trainer.since["b"][3] = 6
    dead = {s: trainer.since[s] > 5 for s in STREAMS}
    assert trainer.none_dead(dead) == {"a", "c"}
