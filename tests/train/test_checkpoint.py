"""Checkpoint files: atomic writes, latest lookup, optimizer state round trip, keys."""

import torch

from sparc.train.checkpoint import (
    checkpoint_key,
    latest_checkpoint,
    load_checkpoint,
    optimizer_tensors,
    restore_optimizer,
    save_checkpoint,
)


def test_save_load_and_keep_only_latest(tmp_path):
    run = tmp_path / "run"
    assert latest_checkpoint(run) is None
    save_checkpoint(run, 5, {"model": {"w": torch.ones(2, 3)}}, {"note": "a"})
    p = save_checkpoint(run, 10, {"model": {"w": torch.zeros(2, 3)}, "trainer": {"c": torch.arange(4)}}, {"note": "b"})
    assert [d.name for d in run.iterdir()] == ["step-00000010"]
    assert latest_checkpoint(run) == p
    ck = load_checkpoint(p)
    assert ck.step == 10 and ck.state["note"] == "b"
    assert torch.equal(ck.tensors["model"]["w"], torch.zeros(2, 3))
    assert torch.equal(ck.tensors["trainer"]["c"], torch.arange(4))


def test_incomplete_tmp_directory_is_ignored(tmp_path):
    run = tmp_path / "run"
    save_checkpoint(run, 3, {"model": {"w": torch.ones(1)}}, {})
    (run / "step-00000009.tmp").mkdir()  # a crash while writing step 9
    assert latest_checkpoint(run).name == "step-00000003"


def test_optimizer_state_round_trip():
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(lin.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        lin(torch.randn(4, 3)).square().sum().backward()
        opt.step()
    names = {p: n for n, p in lin.named_parameters()}
    flat = optimizer_tensors(opt, names)
    assert set(flat) == {f"optim/{n}/{k}" for n in ("weight", "bias") for k in ("step", "exp_avg", "exp_avg_sq")}

    lin2 = torch.nn.Linear(3, 2)
    lin2.load_state_dict(lin.state_dict())
    opt2 = torch.optim.Adam(lin2.parameters(), lr=0.1)
    restore_optimizer(opt2, flat, dict(lin2.named_parameters()))
    x = torch.randn(4, 3)
    for model, o in ((lin, opt), (lin2, opt2)):
        o.zero_grad()
        model(x).square().sum().backward()
        o.step()
    assert torch.equal(lin.weight, lin2.weight) and torch.equal(lin.bias, lin2.bias)


def test_key_is_order_independent_and_sensitive():
    assert checkpoint_key({"a": 1, "b": [1, 2]}) == checkpoint_key({"b": [1, 2], "a": 1})
    assert checkpoint_key({"a": 1}) != checkpoint_key({"a": 2})
    assert len(checkpoint_key({})) == 16


def test_restore_without_copy_owns_the_loaded_tensors():
    """Resuming hands the tensors read from the checkpoint to Adam: no second copy in memory."""
    lin = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(lin.parameters(), lr=0.1)
    lin(torch.randn(4, 3)).square().sum().backward()
    opt.step()
    names = {p: n for n, p in lin.named_parameters()}
    flat = {k: v.clone() for k, v in optimizer_tensors(opt, names).items()}
    opt2 = torch.optim.Adam(lin.parameters(), lr=0.1)
    restore_optimizer(opt2, flat, dict(lin.named_parameters()), copy=False)
    assert opt2.state[lin.weight]["exp_avg"] is flat["optim/weight/exp_avg"]
    restore_optimizer(opt2, flat, dict(lin.named_parameters()))
    assert opt2.state[lin.weight]["exp_avg"] is not flat["optim/weight/exp_avg"]


def test_step_counters_are_placed_as_pytorch_places_them():
    """The 0-d ``step`` of a fused optimizer goes to the parameter's device as float32 (the fused
    CUDA kernel reads it there), a plain optimizer's stays as read: what ``load_state_dict`` does."""
    for fused in (False, True):
        lin = torch.nn.Linear(3, 2)
        opt = torch.optim.Adam(lin.parameters(), lr=0.1, fused=fused)
        lin(torch.randn(4, 3)).square().sum().backward()
        opt.step()
        names = {p: n for n, p in lin.named_parameters()}
        flat = {k: v.double() if k.endswith("/step") else v for k, v in optimizer_tensors(opt, names).items()}
        ours = torch.optim.Adam(lin.parameters(), lr=0.1, fused=fused)
        restore_optimizer(ours, flat, dict(lin.named_parameters()))
        theirs = torch.optim.Adam(lin.parameters(), lr=0.1, fused=fused)
        state = opt.state_dict()
        for index, p in enumerate(opt.param_groups[0]["params"]):  # state_dict keys: parameter positions
            state["state"][index]["step"] = flat[f"optim/{names[p]}/step"]
        theirs.load_state_dict(state)
        for p in lin.parameters():
            got, want = ours.state[p]["step"], theirs.state[p]["step"]
            assert (got.device, got.dtype, float(got)) == (want.device, want.dtype, 1.0)
            assert got.dtype == (torch.float32 if fused else torch.float64)
