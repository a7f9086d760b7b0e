"""Attention-head pruning (Ye et al. 2025) and NeMo-style value-neuron masking (Hintersdorf et al. 2024).

Checked against hand computations: attention recomputed from the projection weights, losses rebuilt from the
scheduler's ``alphas_cumprod``, gradients from a plain ``backward``, z-scores from the ``to_v`` weights.
"""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, DiTTransformer2DModel, UNet2DConditionModel, UNet2DModel
from diffusers.models.attention_processor import Attention
from diffusers.training_utils import EMAModel

from diffusers_hold import HOLDScheduler
from diffusers_hold.bench import BENCH_METHODS, BenchConfig, build_model
from diffusers_hold.mitigations.callbacks import CallbackList, TrainingState
from diffusers_hold.mitigations.head_pruning import (
    AttentionHead,
    HeadPruningCallback,
    attention_heads,
    head_importance,
    prune_heads,
    prune_least_important_heads,
    pruned_heads,
    random_heads,
    sample_small_t,
)
from diffusers_hold.mitigations.value_neurons import (
    find_memorization_neurons,
    mask_value_neurons,
    masked_value_neurons,
    value_neuron_activations,
    value_neuron_z_scores,
)
from diffusers_hold.testing import tiny_unet_2d

ATTN_UNET = {
    "sample_size": 8,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (8, 16),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
    "norm_num_groups": 4,
    "attention_head_dim": 4,
}
COND_UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (4, 8),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 8,
    "attention_head_dim": 2,
    "norm_num_groups": 2,
}


def attn_unet(seed=0):
    torch.manual_seed(seed)
    return UNet2DModel(**ATTN_UNET)


def cond_unet(seed=0):
    torch.manual_seed(seed)
    return UNet2DConditionModel(**COND_UNET)


def randomize_biases(model, seed=1):
    """Diffusers initialises some biases to zero; random ones make the checks stricter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


# --- heads -------------------------------------------------------------------------------------------------------


def test_head_counts_match_the_configs():
    unet = attn_unet()
    c, d = ATTN_UNET["block_out_channels"], ATTN_UNET["attention_head_dim"]
    layers = ATTN_UNET["layers_per_block"]
    # one attention per layer in AttnDownBlock2D, layers + 1 in AttnUpBlock2D (reversed widths), one in the mid block
    expected = layers * c[1] // d + (layers + 1) * c[1] // d + c[-1] // d
    assert len(attention_heads(unet)) == expected == 16
    assert len(attention_heads(tiny_unet_2d(1, 1))) == 16 // 8  # only the mid block, default head dim 8
    assert len(attention_heads(tiny_unet_2d(1, 1, hold_order=2))) == 2

    dit = DiTTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, num_attention_heads=2, attention_head_dim=8,
        num_embeds_ada_norm=10,
    )  # fmt: skip
    heads = attention_heads(dit)
    assert len(heads) == 2 * 2
    assert {h.module for h in heads} == {"transformer_blocks.0.attn1", "transformer_blocks.1.attn1"}

    sd = cond_unet()
    # diffusers' UNet2DConditionModel reads attention_head_dim as the number of heads; transformers: 1 down,
    # 2 up (layers + 1), 1 mid; each has one self- and one cross-attention module
    transformers = layers + (layers + 1) + 1
    per_module = COND_UNET["attention_head_dim"]
    assert len(attention_heads(sd)) == transformers * 2 * per_module == 16
    cross = attention_heads(sd, cross_attention=True)
    assert len(cross) == transformers * per_module and all(h.module.endswith("attn2") for h in cross)
    assert all(h.module.endswith("attn1") for h in attention_heads(sd, cross_attention=False))


def manual_attention(attn, x, drop_head=None):
    """Multi-head self-attention from the projection weights, optionally without one head."""
    q, k, v = (F.linear(x, m.weight, m.bias) for m in (attn.to_q, attn.to_k, attn.to_v))
    b, n, inner = q.shape
    h = attn.heads
    d = inner // h
    q, k, v = (t.reshape(b, n, h, d).transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    heads = weights @ v  # (b, h, n, d)
    out = attn.to_out[0].bias.expand(b, n, -1).clone()
    for i in range(h):
        if i != drop_head:
            out = out + heads[:, i] @ attn.to_out[0].weight[:, i * d : (i + 1) * d].T
    return out


def test_a_pruned_head_contributes_exactly_zero():
    torch.manual_seed(0)
    attn = Attention(query_dim=12, heads=3, dim_head=4, bias=True).eval()
    randomize_biases(attn)
    x = torch.randn(2, 5, 12)
    with torch.no_grad():
        full = attn(x)
        torch.testing.assert_close(full, manual_attention(attn, x), atol=1e-5, rtol=1e-5)
        reference = copy.deepcopy(attn)
        # zeroing the head's value rows also makes it output zero: an independent way to remove it
        reference.to_v.weight[4:8] = 0
        reference.to_v.bias[4:8] = 0
        bias = attn.to_out[0].bias.clone()
        # wrap in a module so prune_heads finds the Attention by name
        holder = torch.nn.ModuleDict({"attn": attn})
        assert prune_heads(holder, [("attn", 1)]) == [AttentionHead("attn", 1)]
        assert torch.equal(attn.to_out[0].bias, bias)  # the bias stays
        torch.testing.assert_close(attn(x), manual_attention(reference, x, drop_head=1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(attn(x), reference(x), atol=1e-6, rtol=0)
        assert not torch.allclose(attn(x), full, atol=1e-3)  # the head did matter
    assert pruned_heads(holder) == [AttentionHead("attn", 1)]


def test_pruning_in_a_unet_equals_zeroing_the_value_rows_and_round_trips(tmp_path):
    unet = attn_unet().eval()
    randomize_biases(unet)
    heads = [AttentionHead("mid_block.attentions.0", 2), AttentionHead("up_blocks.0.attentions.1", 0)]
    reference = copy.deepcopy(unet)
    with torch.no_grad():
        for head in heads:
            to_v = reference.get_submodule(head.module).to_v
            to_v.weight[4 * head.index : 4 * head.index + 4] = 0
            to_v.bias[4 * head.index : 4 * head.index + 4] = 0
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 50])
    with torch.no_grad():
        before = unet(x, t).sample
        prune_heads(unet, heads)
        out = unet(x, t).sample
        torch.testing.assert_close(out, reference(x, t).sample, atol=1e-6, rtol=0)
        assert not torch.allclose(out, before, atol=1e-4)
    assert sorted(pruned_heads(unet)) == sorted(heads)
    assert pruned_heads(reference) == []

    unet.save_pretrained(tmp_path / "pruned")
    reloaded = UNet2DModel.from_pretrained(tmp_path / "pruned").eval()
    assert sorted(pruned_heads(reloaded)) == sorted(heads)
    with torch.no_grad():
        assert torch.equal(reloaded(x, t).sample, out)


def test_bad_heads_raise_clear_errors():
    unet = attn_unet()
    with pytest.raises(ValueError, match="no Attention module named 'mid_block.nothing'"):
        prune_heads(unet, [("mid_block.nothing", 0)])
    with pytest.raises(ValueError, match="out of range for 'mid_block.attentions.0', which has 4 heads"):
        prune_heads(unet, [("mid_block.attentions.0", 4)])
    with pytest.raises(ValueError, match="out of range"):
        prune_heads(unet, [AttentionHead("mid_block.attentions.0", -1)])
    with pytest.raises(ValueError, match="Expected AttentionHead"):
        prune_heads(unet, ["mid_block.attentions.0"])
    # a failed call prunes nothing, even the valid heads before the bad one
    with pytest.raises(ValueError):
        prune_heads(unet, [("mid_block.attentions.0", 0), ("mid_block.attentions.0", 9)])
    assert pruned_heads(unet) == []
    scheduler = DDPMScheduler(num_train_timesteps=100)
    with pytest.raises(ValueError, match="Unknown method 'fisher'"):
        head_importance(unet, scheduler, torch.randn(1, 3, 8, 8), method="fisher")
    with pytest.raises(ValueError, match="num_draws"):
        head_importance(unet, scheduler, torch.randn(1, 3, 8, 8), num_draws=0)
    with pytest.raises(ValueError, match="no attention heads"):
        head_importance(tiny_unet_2d(3, 3), scheduler, torch.randn(1, 3, 8, 8), heads=[])
    for ratio in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"ratio must be a number in \[0, 1\)"):
            prune_least_important_heads(unet, {}, ratio=ratio)
        with pytest.raises(ValueError, match="ratio"):
            random_heads(unet, ratio)
    with pytest.raises(ValueError, match="beta"):
        sample_small_t(scheduler, 4, beta=(0.0, 2.0))
    with pytest.raises(ValueError, match="either heads"):
        HeadPruningCallback([("mid_block.attentions.0", 0)], ratio=0.2)
    with pytest.raises(ValueError, match="needs importance_data"):
        HeadPruningCallback(ratio=0.2)
    with pytest.raises(ValueError, match="prune_at_step"):
        HeadPruningCallback(ratio=0.2, criterion="random", prune_at_step=-1)


# --- importance --------------------------------------------------------------------------------------------------


def test_small_t_draws_follow_beta_and_are_reproducible():
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    global_state = torch.get_rng_state()
    u, t = sample_small_t(scheduler, 20000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), global_state)  # the global RNG is left alone
    a, b = 0.8, 2.0
    mean, var = a / (a + b), a * b / ((a + b) ** 2 * (a + b + 1))
    assert abs(u.mean().item() - mean) < 4 * math.sqrt(var / len(u))
    assert abs(u.var().item() - var) < 0.1 * var
    assert (u < 0.5).float().mean() > 0.75  # small-t emphasis (P(u < 1/2) = 0.80 for Beta(0.8, 2))
    assert torch.equal(t, (u * 1000).floor().long())
    u2, _ = sample_small_t(scheduler, 20000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(u, u2)
    u3, _ = sample_small_t(scheduler, 20000, beta=(2.0, 0.8), generator=torch.Generator().manual_seed(0))
    assert abs(u3.mean().item() - 2.0 / 2.8) < 0.01


def hand_draws(scheduler, clean, num_draws, seed):
    """The draws of head_importance rebuilt by hand: a seed from the generator forks the global RNG for Beta(0.8, 2),
    the noise comes from the generator, and x_t = sqrt(acp) x + sqrt(1 - acp) eps."""
    gen = torch.Generator().manual_seed(seed)
    draws = []
    for _ in range(num_draws):
        fork_seed = int(torch.randint(0, 2**62, (1,), generator=gen))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(fork_seed)
            u = torch.distributions.Beta(
                torch.tensor(0.8, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)
            )
            u = u.sample((len(clean),))
        t = (u * scheduler.config.num_train_timesteps).floor().long()
        noise = torch.randn(clean.shape, generator=gen)
        acp = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        draws.append((acp.sqrt() * clean + (1 - acp).sqrt() * noise, noise, t))
    return draws


def hand_loss(model, draws):
    return sum(((model(x, t).sample - eps) ** 2).mean() for x, eps, t in draws) / len(draws)


def test_masking_importance_is_the_exact_loss_difference():
    unet = attn_unet()
    scheduler = DDPMScheduler(num_train_timesteps=100)
    clean = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    state = copy.deepcopy(unet.state_dict())
    importance = head_importance(unet, scheduler, clean, num_draws=2, generator=torch.Generator().manual_seed(7))
    assert list(importance) == attention_heads(unet)
    for key, value in unet.state_dict().items():  # weights restored
        assert torch.equal(value, state[key]), key
    assert unet.training  # mode restored

    draws = hand_draws(scheduler, clean, 2, seed=7)
    unet.eval()
    with torch.no_grad():
        base = hand_loss(unet, draws).item()
        for head in (AttentionHead("mid_block.attentions.0", 3), AttentionHead("down_blocks.1.attentions.0", 0)):
            ablated = copy.deepcopy(unet)
            ablated.get_submodule(head.module).to_out[0].weight[:, 4 * head.index : 4 * head.index + 4] = 0
            expected = hand_loss(ablated, draws).item() - base
            assert importance[head] == pytest.approx(expected, rel=1e-4, abs=1e-7)
    values = torch.tensor(list(importance.values()))
    assert (values != 0).all() and values.std() > 0  # the heads differ
    again = head_importance(unet, scheduler, clean, num_draws=2, generator=torch.Generator().manual_seed(7))
    assert again == importance
    other = head_importance(unet, scheduler, clean, num_draws=2, generator=torch.Generator().manual_seed(8))
    assert other != importance


def test_taylor_importance_is_the_first_order_term_of_a_plain_backward():
    unet = attn_unet()
    scheduler = DDPMScheduler(num_train_timesteps=100)
    clean = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    importance = head_importance(
        unet, scheduler, clean, method="taylor", num_draws=2, generator=torch.Generator().manual_seed(3)
    )
    assert all(p.grad is None for p in unet.parameters())  # .grad untouched

    reference = copy.deepcopy(unet).eval()
    hand_loss(reference, hand_draws(scheduler, clean, 2, seed=3)).backward()
    for head in attention_heads(unet):
        weight = reference.get_submodule(head.module).to_out[0].weight
        cols = slice(4 * head.index, 4 * head.index + 4)
        expected = (weight[:, cols] * weight.grad[:, cols]).sum().abs().item()
        assert importance[head] == pytest.approx(expected, rel=1e-4, abs=1e-9)

    # frozen weights work too, and stay frozen
    unet.requires_grad_(False)
    frozen = head_importance(
        unet, scheduler, clean, method="taylor", num_draws=2, generator=torch.Generator().manual_seed(3)
    )
    assert frozen == pytest.approx(importance, rel=1e-5) and not any(p.requires_grad for p in unet.parameters())


def test_importance_with_hold_and_a_dit():
    scheduler = HOLDScheduler(order=2)
    unet = tiny_unet_2d(in_channels=1, out_channels=1, hold_order=2)
    clean = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for method in ("masking", "taylor"):
        importance = head_importance(
            unet, scheduler, clean, method=method, num_draws=2, generator=torch.Generator().manual_seed(0)
        )
        assert list(importance) == attention_heads(unet) and len(importance) == 2
        assert all(math.isfinite(v) for v in importance.values())
        assert any(v != 0 for v in importance.values())

    dit = DiTTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, num_attention_heads=2, attention_head_dim=8,
        num_embeds_ada_norm=10,
    )  # fmt: skip
    importance = head_importance(
        dit,
        DDPMScheduler(num_train_timesteps=100),
        torch.randn(2, 4, 8, 8),
        num_draws=1,
        forward_kwargs={"class_labels": torch.tensor([1, 2])},
        generator=torch.Generator().manual_seed(0),
    )
    assert len(importance) == 4 and all(math.isfinite(v) for v in importance.values())


def test_prune_least_important_heads_picks_the_lowest():
    unet = attn_unet()
    heads = attention_heads(unet)
    values = torch.randperm(len(heads), generator=torch.Generator().manual_seed(0)).tolist()
    importance = {h: float(v) - 3.5 for h, v in zip(heads, values, strict=True)}
    pruned = prune_least_important_heads(unet, importance, ratio=0.25)
    expected = [heads[values.index(rank)] for rank in range(4)]  # values 0..3 are the four smallest
    assert pruned == expected and len(pruned) == round(0.25 * 16)
    assert sorted(pruned_heads(unet)) == sorted(expected)
    assert prune_least_important_heads(attn_unet(), importance, ratio=0.0) == []
    # the ranking is global: only the heads given are ranked
    one_module = {h: v for h, v in importance.items() if h.module == "mid_block.attentions.0"}
    assert len(prune_least_important_heads(attn_unet(), one_module, ratio=0.5)) == 2


def test_random_heads_control():
    unet = attn_unet()
    drawn = random_heads(unet, 0.2, torch.Generator().manual_seed(0))
    assert len(drawn) == round(0.2 * 16) == 3 and len(set(drawn)) == 3
    assert set(drawn) <= set(attention_heads(unet))
    assert drawn == random_heads(unet, 0.2, torch.Generator().manual_seed(0))
    draws = {tuple(random_heads(unet, 0.2, torch.Generator().manual_seed(s))) for s in range(10)}
    assert len(draws) > 5
    sd = cond_unet()
    assert all(h.module.endswith("attn2") for h in random_heads(sd, 0.5, cross_attention=True))
    callback = HeadPruningCallback(ratio=0.2, criterion="random", seed=3)
    assert callback.prune_now(unet) == random_heads(unet, 0.2, torch.Generator().manual_seed(3))
    assert sorted(pruned_heads(unet)) == sorted(callback.heads)


# --- callback ----------------------------------------------------------------------------------------------------


def train(unet, callbacks, steps, seed=0, ema=None):
    """A plain loop in the callback protocol's order, with AdamW (and an EMA updated before ``on_step_end``)."""
    scheduler = DDPMScheduler(num_train_timesteps=100)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-2)
    state = TrainingState(noise_scheduler=scheduler, model=unet)
    gen = torch.Generator().manual_seed(seed)
    history = []
    for _ in range(steps):
        callbacks.on_batch({}, state)
        clean = torch.randn(2, 3, 8, 8, generator=gen)
        timesteps, _ = callbacks.sample_timesteps(2, state)
        noise = torch.randn(clean.shape, generator=gen)
        loss = ((unet(scheduler.add_noise(clean, noise, timesteps), timesteps).sample - noise) ** 2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if ema is not None:
            ema.step(unet.parameters())
        state.global_step += 1
        callbacks.on_step_end(state)
        history.append(sorted(pruned_heads(unet)))
    return history


def test_callback_prunes_the_ema_weights_exactly_too():
    heads = [AttentionHead("mid_block.attentions.0", 1)]
    plain_ema_unet, unet = attn_unet(), attn_unet()
    plain_ema = EMAModel(plain_ema_unet.parameters(), decay=0.5)
    train(plain_ema_unet, CallbackList([HeadPruningCallback(heads)]), steps=2, ema=plain_ema)
    plain_ema.copy_to(plain_ema_unet.parameters())
    assert pruned_heads(plain_ema_unet) == []  # without ema= the EMA averages in each update's regrowth

    ema = EMAModel(unet.parameters(), decay=0.5)
    train(unet, CallbackList([HeadPruningCallback(heads, ema=ema)]), steps=2, ema=ema)
    ema.copy_to(unet.parameters())
    assert pruned_heads(unet) == heads
    with pytest.raises(ValueError, match="EMA of all of the model's parameters"):
        partial = EMAModel(list(unet.parameters())[:3])
        HeadPruningCallback(heads, ema=partial).on_step_end(TrainingState(DDPMScheduler(), unet))


def test_callback_keeps_heads_zero_while_adamw_would_regrow_them():
    heads = [AttentionHead("mid_block.attentions.0", 1), AttentionHead("up_blocks.0.attentions.0", 3)]
    without = attn_unet()
    prune_heads(without, heads)
    history = train(without, CallbackList(), steps=1)
    assert history == [[]]  # one AdamW step regrows the columns

    unet = attn_unet()
    initial = copy.deepcopy(unet.state_dict())
    callback = HeadPruningCallback(heads)
    history = train(unet, CallbackList([callback]), steps=3)
    assert history == [sorted(heads)] * 3
    changed = unet.get_submodule("mid_block.attentions.0").to_out[0].weight[:, :4]
    assert not torch.equal(changed, initial["mid_block.attentions.0.to_out.0.weight"][:, :4])  # others train

    saved = json.loads(json.dumps(callback.state_dict()))  # plain Python
    assert saved == {"heads": [["mid_block.attentions.0", 1], ["up_blocks.0.attentions.0", 3]]}
    resumed = HeadPruningCallback(ratio=0.5, criterion="random")
    resumed.load_state_dict(saved)
    fresh = attn_unet()
    state = TrainingState(noise_scheduler=DDPMScheduler(), model=fresh, global_step=3)
    resumed.on_batch({}, state)  # a resumed run re-applies them at once
    assert sorted(pruned_heads(fresh)) == sorted(heads)
    assert len(pruned_heads(fresh)) == 2  # and does not choose new ones
    with pytest.raises(ValueError, match="expects a state with 'heads'"):
        resumed.load_state_dict({})


def test_callback_measures_and_prunes_at_the_requested_step():
    data = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    callback = HeadPruningCallback(ratio=0.25, importance_data=data, prune_at_step=2, num_draws=1, seed=4)
    unet = attn_unet()
    history = train(unet, CallbackList([callback]), steps=4)
    assert history[0] == history[1] == []  # prunes after 2 updates
    assert len(history[2]) == 4 and history[2] == history[3] == sorted(callback.heads)

    # a loop can prune itself with prune_now; for the same weights and seed it picks what head_importance ranks lowest
    model = attn_unet()
    direct = HeadPruningCallback(ratio=0.25, importance_data=data, num_draws=1, seed=4)
    chosen = direct.prune_now(model, DDPMScheduler(num_train_timesteps=100))
    importance = head_importance(
        attn_unet(),
        DDPMScheduler(num_train_timesteps=100),
        data,
        num_draws=1,
        generator=torch.Generator().manual_seed(4),
    )
    assert sorted(chosen) == sorted(sorted(importance, key=importance.get)[:4])
    assert sorted(pruned_heads(model)) == sorted(chosen)


def test_callback_prunes_the_least_important_heads_of_a_dit_with_its_class_labels():
    # the bench's DiT (issue 15: pruning where Ye et al. prune), with the class labels its forward needs
    method, config = BENCH_METHODS["dit_prune20"], BenchConfig(methods=["dit_prune20"])
    data = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    dit, scheduler = build_model(method, config, channels=1)
    assert isinstance(dit, DiTTransformer2DModel) and len(attention_heads(dit)) == 32
    [callback] = method.callbacks(scheduler, config, data)
    callback.num_draws = 1  # keep the test short; the choice is still ranked on the same draws as below
    chosen = callback.prune_now(dit, scheduler)
    importance = head_importance(
        build_model(method, config, channels=1)[0],
        scheduler,
        data,
        num_draws=1,
        forward_kwargs={"class_labels": torch.zeros(4, dtype=torch.long)},
        generator=torch.Generator().manual_seed(config.seed),
    )
    assert sorted(chosen) == sorted(sorted(importance, key=importance.get)[: round(0.2 * 32)])
    assert sorted(pruned_heads(dit)) == sorted(chosen)
    out = dit(torch.randn(2, 1, 8, 8), torch.tensor([5, 50]), class_labels=torch.zeros(2, dtype=torch.long)).sample
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()


# --- NeMo --------------------------------------------------------------------------------------------------------


def test_value_activations_and_z_scores_match_hand_computation():
    unet = cond_unet()
    randomize_biases(unet)
    gen = torch.Generator().manual_seed(0)
    memorized, reference = torch.randn(1, 6, 8, generator=gen), torch.randn(10, 6, 8, generator=gen)
    activations = value_neuron_activations(unet, reference)
    names = [n for n, m in unet.named_modules() if n.endswith("attn2")]
    assert sorted(activations) == sorted(names)
    scores = value_neuron_z_scores(unet, memorized, reference)
    for name in names:
        to_v = unet.get_submodule(name).to_v
        ref = (reference @ to_v.weight.T.detach()).abs().mean(1)  # SD's to_v has no bias
        torch.testing.assert_close(activations[name], ref)
        mem = (memorized @ to_v.weight.T.detach()).abs().mean(1)[0]
        n = len(ref)
        mean = ref.sum(0) / n
        std = (((ref - mean) ** 2).sum(0) / (n - 1)).sqrt()
        torch.testing.assert_close(scores[name], (mem - mean) / std)


def test_an_extreme_neuron_is_found_and_masked(tmp_path):
    unet = cond_unet()
    gen = torch.Generator().manual_seed(0)
    reference = torch.randn(32, 6, 8, generator=gen)
    layer, neuron = "down_blocks.1.attentions.0.transformer_blocks.0.attn2", 5
    weight = unet.get_submodule(layer).to_v.weight.detach()
    # a text direction that moves only this neuron's value (weight is 8 x 8 and invertible)
    direction = torch.linalg.solve(weight, 20.0 * torch.eye(8)[neuron])
    memorized = reference[:1] + direction
    torch.testing.assert_close(
        memorized @ weight.T - reference[:1] @ weight.T,
        (20.0 * torch.eye(8)[neuron]).expand(1, 6, 8),
        atol=1e-4,
        rtol=0,
    )
    found = find_memorization_neurons(unet, memorized, reference, z_threshold=4.0)
    assert found[layer] == [neuron]
    assert find_memorization_neurons(unet, reference[:1], reference, z_threshold=4.0) == {}

    masked = mask_value_neurons(unet, {layer: [neuron, 1]})
    assert masked == {layer: [1, neuron]}
    prompts = torch.randn(3, 6, 8, generator=gen)
    to_v = unet.get_submodule(layer).to_v
    values = to_v(prompts)
    assert torch.equal(values[..., [1, neuron]], torch.zeros(3, 6, 2))
    assert (values[..., [0, 2, 3, 4, 6, 7]] != 0).all()
    assert (value_neuron_activations(unet, prompts)[layer][:, [1, neuron]] == 0).all()
    assert masked_value_neurons(unet) == {layer: [1, neuron]}

    unet.save_pretrained(tmp_path / "masked")
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path / "masked")
    assert masked_value_neurons(reloaded) == {layer: [1, neuron]}
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([10])
    with torch.no_grad():
        # same weights; a reloaded SD UNet differs from the original in the last bits here, masked or not
        torch.testing.assert_close(
            reloaded(x, t, prompts[:1]).sample, unet(x, t, prompts[:1]).sample, atol=1e-6, rtol=0
        )

    with pytest.raises(ValueError, match="no cross-attention module named 'attn9'"):
        mask_value_neurons(unet, {"attn9": [0]})
    with pytest.raises(ValueError, match=r"Neuron indices \[8\] are out of range"):
        mask_value_neurons(unet, {layer: [8]})
    with pytest.raises(ValueError, match="no cross-attention modules"):
        value_neuron_activations(attn_unet(), prompts)
    with pytest.raises(ValueError, match="At least 2 reference prompts"):
        value_neuron_z_scores(unet, memorized, reference[:1])


def test_masking_a_value_neuron_with_a_bias_zeroes_it_exactly():
    torch.manual_seed(0)
    holder = torch.nn.ModuleDict(
        {"attn2": Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4, bias=True)}
    )
    to_v = holder["attn2"].to_v
    assert to_v.bias is not None and (to_v.bias != 0).all()
    prompts = torch.randn(2, 5, 6)
    expected = (prompts @ to_v.weight.T.detach() + to_v.bias.detach()).abs().mean(1)
    torch.testing.assert_close(value_neuron_activations(holder, prompts)["attn2"], expected)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    first_three = (prompts[0, :3] @ to_v.weight.T.detach() + to_v.bias.detach()).abs().mean(0)
    masked_mean = value_neuron_activations(holder, prompts, attention_mask=mask)["attn2"]
    torch.testing.assert_close(masked_mean[0], first_three)
    torch.testing.assert_close(masked_mean[1], expected[1])
    mask_value_neurons(holder, {"attn2": [2]})
    with torch.no_grad():
        values = to_v(prompts)
    assert torch.equal(values[..., 2], torch.zeros(2, 5)) and (values[..., [0, 1, 3]] != 0).all()
    assert masked_value_neurons(holder) == {"attn2": [2]}
