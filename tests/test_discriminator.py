"""The online discriminator (Chaffin et al. 2024): reward before update, BCE step, exact resume, input checks."""

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from clip_rl_trl.rewards.discriminator import Discriminator, EmbeddingPair

D = 8


def _emb(n: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, D, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _batch(step: int) -> tuple[EmbeddingPair, EmbeddingPair]:
    img = _emb(4, 1000 + step)
    return EmbeddingPair(img, _emb(4, 2000 + step)), EmbeddingPair(img.repeat(2, 1), _emb(8, 3000 + step))


def _params(disc: Discriminator) -> list[torch.Tensor]:
    return [p.detach().clone() for p in disc.parameters()]


def test_reward_is_sigmoid_of_the_mlp_on_the_concatenation() -> None:
    disc = Discriminator(D, hidden_dims=(16,), seed=0)
    img, txt = _emb(3, 1), _emb(3, 2)
    lin1, lin2 = disc.net[0], disc.net[2]
    x = torch.cat([img, txt], dim=-1)  # image first, then text
    expected = torch.sigmoid(torch.relu(x @ lin1.weight.T + lin1.bias) @ lin2.weight.T + lin2.bias).squeeze(
        -1
    )
    reward = disc.reward(img, txt)
    torch.testing.assert_close(reward, expected)
    assert reward.shape == (3,) and reward.dtype == torch.float32 and not reward.requires_grad


def test_default_architecture_is_the_released_one() -> None:
    disc = Discriminator(512)
    shapes = [tuple(p.shape) for p in disc.parameters()]
    assert shapes == [(512, 1024), (512,), (256, 512), (256,), (1, 256), (1,)]
    assert disc.optimizer.param_groups[0]["lr"] == 7e-5


def test_seed_makes_initialisation_reproducible_without_touching_global_rng() -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, b = Discriminator(D, seed=5), Discriminator(D, seed=5)
    assert torch.rand(1) == before
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q)


def test_reward_uses_pre_update_parameters_and_never_changes_them() -> None:
    disc = Discriminator(D, hidden_dims=(16,), lr=1e-2, seed=0)
    gt, gen = _batch(0)
    gen = EmbeddingPair(gen.img_emb, F.normalize(gen.txt_emb + 2 * F.normalize(torch.ones(D), dim=0), dim=-1))
    params = _params(disc)
    # The trainer's order: reward first, then update.
    r_before = disc.reward(gen.img_emb, gen.txt_emb)
    again = disc.reward(gen.img_emb, gen.txt_emb)
    for p, q in zip(params, disc.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    torch.testing.assert_close(r_before, again, rtol=0, atol=0)
    assert all(p.grad is None for p in disc.parameters())

    stats = disc.update(gt, gen)
    r_after = disc.reward(gen.img_emb, gen.txt_emb)
    assert not torch.allclose(r_before, r_after)
    assert any(not torch.equal(p, q) for p, q in zip(params, disc.parameters(), strict=True))
    # The stats describe the forward pass before the update, i.e. the same probabilities the reward read.
    assert stats["prob_generated"] == pytest.approx(r_before.mean().item(), abs=1e-6)
    assert r_after.mean() < r_before.mean()  # one step on separable data pushes generated captions towards 0


def test_update_loss_is_class_balanced_bce_and_stats_are_right() -> None:
    disc = Discriminator(D, hidden_dims=(16,), seed=0)
    gt, gen = _batch(1)
    with torch.no_grad():
        p_gt, p_gen = disc.reward(*gt), disc.reward(*gen)
    expected = 0.5 * (-(p_gt.log().mean()) - (1 - p_gen).log().mean())
    stats = disc.update(gt, gen)
    assert stats["loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert stats["accuracy_gt"] == pytest.approx((p_gt > 0.5).float().mean().item())
    assert stats["accuracy_generated"] == pytest.approx((p_gen <= 0.5).float().mean().item())
    assert stats["prob_gt"] == pytest.approx(p_gt.mean().item(), abs=1e-6)
    assert set(stats) == {"loss", "accuracy_gt", "accuracy_generated", "prob_gt", "prob_generated"}


def test_update_is_one_plain_adam_step() -> None:
    disc = Discriminator(D, hidden_dims=(16,), lr=1e-3, seed=0)
    ref = copy.deepcopy(disc.net)
    opt = torch.optim.Adam(ref.parameters(), lr=1e-3)
    for step in range(3):
        gt, gen = _batch(step)
        disc.update(gt, tuple(gen))  # a plain tuple works too
        opt.zero_grad()
        z_gt = ref(torch.cat(list(gt), -1)).squeeze(-1)
        z_gen = ref(torch.cat(list(gen), -1)).squeeze(-1)
        loss = 0.5 * (
            F.binary_cross_entropy_with_logits(z_gt, torch.ones(4))
            + F.binary_cross_entropy_with_logits(z_gen, torch.zeros(8))
        )
        loss.backward()
        opt.step()
    for p, q in zip(disc.net.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q)


def test_learns_to_separate_human_from_generated() -> None:
    disc = Discriminator(D, hidden_dims=(32,), lr=1e-2, seed=0)
    shift = F.normalize(torch.ones(D), dim=0)
    for step in range(60):
        gt, gen = _batch(step)
        gen = EmbeddingPair(gen.img_emb, F.normalize(gen.txt_emb + 2 * shift, dim=-1))
        stats = disc.update(gt, gen)
    assert stats["accuracy_gt"] > 0.9 and stats["accuracy_generated"] > 0.9


def test_resume_is_exact_through_torch_save_and_safetensors(tmp_path) -> None:
    straight = Discriminator(D, hidden_dims=(16, 8), lr=1e-2, seed=0)
    for step in range(6):
        straight.update(*_batch(step))

    first = Discriminator(D, hidden_dims=(16, 8), lr=1e-2, seed=0)
    for step in range(3):
        first.update(*_batch(step))
    state = first.state_dict()
    assert {
        "optimizer.lr",
        "optimizer.state.0.exp_avg",
        "optimizer.state.0.exp_avg_sq",
        "optimizer.state.0.step",
    } <= set(state)
    assert all(isinstance(v, torch.Tensor) for v in state.values())

    torch.save(state, tmp_path / "disc.pt")
    save_file(state, tmp_path / "disc.safetensors")
    for loaded in (
        torch.load(tmp_path / "disc.pt", weights_only=True),
        load_file(tmp_path / "disc.safetensors"),
    ):
        resumed = Discriminator(
            D, hidden_dims=(16, 8), lr=5.0, seed=99
        )  # other init, other lr: both restored
        resumed.load_state_dict(loaded)
        assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2)
        for step in range(3, 6):
            resumed.update(*_batch(step))
        for p, q in zip(straight.parameters(), resumed.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_without_the_optimizer_state_the_run_differs() -> None:
    """Guards the resume test: weights alone are not enough to reproduce the run."""
    straight = Discriminator(D, hidden_dims=(16,), lr=1e-2, seed=0)
    for step in range(4):
        straight.update(*_batch(step))
    first = Discriminator(D, hidden_dims=(16,), lr=1e-2, seed=0)
    for step in range(2):
        first.update(*_batch(step))
    weights_only = {k: v for k, v in first.state_dict().items() if not k.startswith("optimizer.")}
    fresh = Discriminator(D, hidden_dims=(16,), lr=1e-2, seed=1)
    fresh.load_state_dict(weights_only)  # a pre-trained discriminator: weights, fresh optimizer
    assert not fresh.optimizer.state
    for step in range(2, 4):
        fresh.update(*_batch(step))
    assert any(
        not torch.allclose(p, q, atol=1e-6)
        for p, q in zip(straight.parameters(), fresh.parameters(), strict=True)
    )


def test_state_dict_nests_inside_a_parent_module() -> None:
    parent = torch.nn.ModuleDict({"disc": Discriminator(D, hidden_dims=(16,), seed=0)})
    parent["disc"].update(*_batch(0))
    state = parent.state_dict()
    assert "disc.optimizer.state.0.exp_avg" in state and "disc.net.0.weight" in state
    other = torch.nn.ModuleDict({"disc": Discriminator(D, hidden_dims=(16,), seed=1)})
    other.load_state_dict(state)
    for p, q in zip(parent.parameters(), other.parameters(), strict=True):
        torch.testing.assert_close(p, q)
    a, b = parent["disc"].optimizer.state, other["disc"].optimizer.state
    for p, q in zip(parent["disc"].parameters(), other["disc"].parameters(), strict=True):
        torch.testing.assert_close(a[p]["exp_avg_sq"], b[q]["exp_avg_sq"])


def test_load_rejects_a_mismatched_state() -> None:
    disc = Discriminator(D, hidden_dims=(16,), seed=0)
    disc.update(*_batch(0))
    state = disc.state_dict()
    with pytest.raises(RuntimeError, match="size mismatch"):
        Discriminator(D, hidden_dims=(32,)).load_state_dict(state)
    del state["optimizer.state.1.exp_avg"]
    with pytest.raises(RuntimeError, match="incomplete"):
        Discriminator(D, hidden_dims=(16,)).load_state_dict(state)


def test_computes_in_float32_for_half_inputs() -> None:
    disc = Discriminator(D, hidden_dims=(16,), seed=0)
    img, txt = _emb(2, 1), _emb(2, 2)
    reward = disc.reward(img.half(), txt.half())
    assert reward.dtype == torch.float32
    torch.testing.assert_close(reward, disc.reward(img.half().float(), txt.half().float()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_follows_the_inputs_device_with_its_optimizer_state() -> None:
    disc = Discriminator(D, hidden_dims=(16,), seed=0)
    disc.update(*_batch(0))
    gt, gen = _batch(1)
    cuda = lambda pair: EmbeddingPair(pair.img_emb.cuda(), pair.txt_emb.cuda())  # noqa: E731
    disc.update(cuda(gt), cuda(gen))
    assert disc.device.type == "cuda"
    assert all(s["exp_avg"].is_cuda for s in disc.optimizer.state.values())
    assert disc.reward(*cuda(gt)).is_cuda


def test_bad_inputs_fail_loudly_naming_the_argument() -> None:
    disc = Discriminator(D, hidden_dims=(16,))
    img, txt = _emb(3, 1), _emb(3, 2)
    with pytest.raises(ValueError, match="txt_emb contains NaN"):
        disc.reward(img, torch.full_like(txt, float("nan")))
    with pytest.raises(ValueError, match=r"img_emb must have shape \(N, 8\)"):
        disc.reward(img[:, :4], txt)
    with pytest.raises(ValueError, match="same number of rows"):
        disc.reward(img[:2], txt)
    with pytest.raises(ValueError, match="img_emb is empty"):
        disc.reward(img[:0], txt[:0])
    with pytest.raises(TypeError, match="img_emb must be a torch.Tensor"):
        disc.reward(img.tolist(), txt)
    gt, gen = _batch(0)
    with pytest.raises(TypeError, match="gt must be a pair"):
        disc.update(gt.txt_emb, gen)  # the easy mistake: text embeddings instead of (image, text) pairs
    with pytest.raises(TypeError, match="generated must be a pair"):
        disc.update(gt, (gen.img_emb, gen.txt_emb, gen.txt_emb))
    with pytest.raises(ValueError, match="generated.txt_emb contains NaN"):
        disc.update(gt, EmbeddingPair(gen.img_emb, torch.full_like(gen.txt_emb, float("nan"))))
    with pytest.raises(ValueError, match="gt.img_emb and gt.txt_emb must have the same number of rows"):
        disc.update(EmbeddingPair(gt.img_emb[:2], gt.txt_emb), gen)
    with pytest.raises(ValueError, match="embed_dim"):
        Discriminator(0)
    with pytest.raises(ValueError, match="lr"):
        Discriminator(D, lr=0.0)
