"""modrt.train.methods: the E-step variants, balancing, warm start, hash routing, the
all-modules step, and the options' validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modrt.train import data
from modrt.train import model as lm
from modrt.train.config import ModelConfig, TrainConfig
from modrt.train.methods import Window, build, em, hash

T, B, M, V = 6, 8, 4, 12


def _setup(tiny_model_config, k=1, seed=0, **kw):
    torch.manual_seed(seed)
    model = lm.ModularLM(tiny_model_config(vocab_size=V, modules=M, k=k, dropout=0.0, **kw))
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randint(0, V, (T, B), generator=g)
    y = torch.randint(0, V, (T, B), generator=g)
    h = torch.randn(B, model.cfg.hidden, generator=g)
    return model, x, y, h


@pytest.mark.parametrize("k,samples", [(1, 4), (1, 2), (2, 3)])
@pytest.mark.parametrize("prior_weight", [0.0, 1.0])
def test_position_e_step_never_lowers_the_window_score(tiny_model_config, k, samples, prior_weight):
    model, x, y, h = _setup(tiny_model_config, k=k)
    g = torch.Generator().manual_seed(3)
    a = torch.randint(0, M, (T, B, k), generator=g)
    accepted = 0
    for _ in range(4):
        before = em.window_scores(model, x, y, h, a, prior_weight)
        e = em.position_e_step(model, x, y, h, a, samples, generator=g, prior_weight=prior_weight)
        after = em.window_scores(model, x, y, h, e.best, prior_weight)
        assert (after >= before - 1e-5).all()
        # a changed window took the path, whose score the search reported
        changed = e.changed
        torch.testing.assert_close(after[changed], e.scores[1][changed], atol=1e-4, rtol=0)
        torch.testing.assert_close(e.scores[0], before, atol=1e-4, rtol=0)
        accepted += int(changed.sum())
        a = e.best
    assert accepted > 0  # from random a*, the search finds better paths


def test_position_e_step_keeps_a_star_when_nothing_is_better(tiny_model_config):
    # The controller is certain of module 2 and a* is module 2 everywhere: under the joint
    # score every other module costs ~40 nats of prior per step, so nothing beats a*.
    model, x, y, h = _setup(tiny_model_config)
    with torch.no_grad():
        model.layer.controller.weight.zero_()
        model.layer.controller.bias.zero_()
        model.layer.controller.bias[2] = 40.0
    a = torch.full((T, B, 1), 2)
    e = em.position_e_step(model, x, y, h, a, samples=M, prior_weight=1.0)
    assert not e.changed.any() and torch.equal(e.best, a)


def test_position_e_step_finds_a_one_position_gain(tiny_model_config):
    # Likelihood score; a* = the stored path with one position set to its worst module:
    # the per-position search sees every module at every step (K=1, S >= M).
    model, x, y, h = _setup(tiny_model_config)
    a = torch.zeros(T, B, 1, dtype=torch.long)
    e = em.position_e_step(model, x, y, h, a, samples=M, prior_weight=0.0)
    greedy_path = e.candidates[1]
    # every step of the path is that step's best module from the path's state
    out = model(x, h, lm.given(greedy_path))
    assert torch.isfinite(out.hs).all()
    assert e.changed.any()


def test_balancing_bias_lowers_the_largest_modules_share(tiny_model_config):
    # A constructed collapse: the controller puts 6 nats on module 0, so the joint score's
    # E-step sends everything there; the loss-free bias moves a* off it within a few E-steps.
    model, x, y, h = _setup(tiny_model_config)
    with torch.no_grad():
        model.layer.controller.bias.zero_()
        model.layer.controller.bias[0] = 6.0
    g = torch.Generator().manual_seed(4)
    a = torch.zeros(T, B, 1, dtype=torch.long)

    def share(bias, a):
        for _ in range(3):
            a = em.position_e_step(model, x, y, h, a, samples=M, generator=g, prior_weight=1.0, bias=bias).best
        return float((a == 0).float().mean()), a

    collapsed, _ = share(None, a)
    assert collapsed == 1.0
    bias = torch.zeros(M)
    for _ in range(30):  # the EM method's update: bias += rate * sign(mean load - load)
        a = em.position_e_step(model, x, y, h, a, samples=M, generator=g, prior_weight=1.0, bias=bias).best
        load = torch.bincount(a.flatten(), minlength=M).float()
        bias += 0.5 * torch.sign(load.mean() - load)
    assert float((a == 0).float().mean()) < 0.6


def test_window_e_step_bias_enters_the_score(tiny_model_config):
    model, x, y, h = _setup(tiny_model_config)
    a = torch.zeros(T, B, 1, dtype=torch.long)
    bias = torch.tensor([-100.0, 0.0, 0.0, 0.0])  # module 0 is barred
    e = em.e_step(model, x, y, h, a, samples=6, generator=torch.Generator().manual_seed(0), bias=bias)
    assert e.changed.all()


def test_one_module_equals_a_plain_gru(tiny_model_config):
    # M = K = 1: the modular layer is a GRU; the all-modules step and nn.GRU agree.
    torch.manual_seed(0)
    x, h = torch.randint(0, V, (T, B)), torch.randn(B, 16)
    model = lm.ModularLM(tiny_model_config(vocab_size=V, modules=1, k=1, dropout=0.0))
    assert model.layer.compute_all
    gru = torch.nn.GRU(model.cfg.embedding, model.cfg.hidden)
    cell = model.layer.cells[0]
    with torch.no_grad():
        for a, b in (("weight_ih_l0", "weight_ih"), ("weight_hh_l0", "weight_hh"),
                     ("bias_ih_l0", "bias_ih"), ("bias_hh_l0", "bias_hh")):
            getattr(gru, a).copy_(getattr(cell, b))
        out = model(x, h, lm.greedy_policy())
        ref, last = gru(model.embed(x), h.unsqueeze(0))
    torch.testing.assert_close(out.hs, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.h_last, last[0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("k,combine", [(1, "mean"), (2, "mean"), (2, "sum"), (3, "mean"), (3, "sum")])
def test_all_modules_step_equals_dispatch(tiny_model_config, k, combine, monkeypatch):
    # values and gradients; a row may hold a module in several slots (it counts once)
    model, x, y, h = _setup(tiny_model_config, k=k, combine=combine)
    a = torch.randint(0, M, (T, B, k), generator=torch.Generator().manual_seed(9))
    if k > 1:
        a[0, 0] = 2
        a[1, 1, 1:] = a[1, 1, 0]
    assert model.layer.compute_all

    def run():
        model.zero_grad()
        out = model(x, h, lm.given(a))
        (model.token_log_likelihood(out.hs, y).sum() + out.log_pa.sum()).backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    fast, g_fast = run()
    # the selected modules' state from every module's projections equals all states, masked
    layer = model.layer
    w_ih, b_ih, w_hh, b_hh = layer.stacked()
    with torch.no_grad():
        gi = F.linear(model.embed(x[0]), w_ih, b_ih)
        masked = torch.einsum("bm,bmh->bh", layer.mask(a[0]), layer.all_states(gi, h, w_hh, b_hh))
        torch.testing.assert_close(layer.selected(gi, h, a[0], w_hh, b_hh), masked, atol=1e-6, rtol=1e-5)
    monkeypatch.setattr(lm, "ALL_MODULES_MAX", 0)
    assert not model.layer.compute_all
    slow, g_slow = run()
    torch.testing.assert_close(fast.hs, slow.hs, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fast.log_pa, slow.log_pa)
    for name, grad in g_slow.items():  # the dispatch path leaves unused modules without a gradient
        torch.testing.assert_close(g_fast[name], grad, atol=1e-5, rtol=1e-4)
    for name in g_fast.keys() - g_slow.keys():
        assert (g_fast[name] == 0).all()


def test_hash_table_is_frequency_balanced():
    counts = torch.tensor([100, 60, 50, 40, 30, 20, 10, 5, 5, 0])
    table = hash.balanced_table(counts, modules=3, k=1)
    load = torch.zeros(3).index_add_(0, table[:, 0], counts.float())
    assert load.tolist() == [105.0, 110.0, 105.0]  # 100 | 60+30+20 | 50+40+10+5; the last 5 and 0 to module 0/2
    two = hash.balanced_table(counts, modules=3, k=2)
    assert (two[:, 0] != two[:, 1]).all()  # K distinct modules per word


def test_hash_routing_follows_the_current_word(tiny_model_config):
    mcfg = tiny_model_config(vocab_size=V, modules=M, k=1, method="hash")
    model = lm.ModularLM(mcfg)
    tokens = torch.randint(0, V, (50, 4))
    method = build(model, mcfg, TrainConfig(bptt=T, batch_size=B), B, T, tokens)
    x, y = torch.randint(0, V, (T, B)), torch.randint(0, V, (T, B))
    losses = method.losses(Window(x, y, model.init_hidden(B), 0, 0, 0))
    assert torch.equal(losses.out.a[..., 0], model.hash_table[x, 0])
    assert model.layer.controller is None and losses.aux == {}
    assert not mcfg.exportable


def test_hash_start_gives_each_position_its_input_words_modules(tiny_model_config):
    # 23 rows of 3 streams, T=6: windows 0-2 full, window 3 of 4 steps (rows 18-21 in, 19-22 out)
    k = 2
    mcfg = tiny_model_config(vocab_size=V, modules=M, k=k)
    tokens = torch.randint(0, V, (23, 3), generator=torch.Generator().manual_seed(5))
    W, S = 4, 3
    method = build(lm.ModularLM(mcfg), mcfg, TrainConfig(bptt=T, batch_size=S, a_star_init="hash"), W * S, T, tokens)
    table = hash.balanced_table(torch.bincount(tokens.flatten(), minlength=V), M, k)
    memory = method.state()["memory"]
    assert memory.shape == (W * S, T, k) and memory.dtype == torch.int16
    for w in range(W):
        x, _ = data.window(tokens, w, T)
        for b in range(S):
            assert torch.equal(memory[w * S + b, : len(x)].long(), table[x[:, b]]), (w, b)
    # a random start is another memory of the same shape
    rand = build(lm.ModularLM(mcfg), mcfg, TrainConfig(bptt=T, batch_size=S), W * S, T, tokens).state()["memory"]
    assert rand.shape == memory.shape and not torch.equal(rand, memory)


def test_hash_start_refuses_images_and_other_methods():
    from modrt.train import conv
    from modrt.train.config import ImageModelConfig

    icfg = ImageModelConfig(channels=(4,), modules=2)
    with pytest.raises(ValueError, match="images have none"):
        build(conv.ModularConvNet(icfg), icfg, TrainConfig(a_star_init="hash"), 10, 1)
    with pytest.raises(ValueError, match="a_star_init 'words' unknown"):
        TrainConfig(a_star_init="words")


def test_warm_start_copies_the_dense_cell(tiny_model_config):
    mcfg = tiny_model_config(vocab_size=V, modules=M, k=1, dropout=0.0)
    model = lm.ModularLM(mcfg)
    method = build(model, mcfg, TrainConfig(bptt=T, batch_size=B, warm_start=2), B, T)
    x, y = torch.randint(0, V, (T, B)), torch.randint(0, V, (T, B))
    h = model.init_hidden(B)
    first = Window(x, y, h, 0, 0, 0)
    dense = method.losses(first)
    assert (dense.out.a == 0).all() and dense.aux == {}  # the dense phase: module 0, no controller loss
    method.after_step(first, dense)
    assert not method.state()["upcycled"]  # one dense step left
    last = Window(x, y, h, 0, 0, 1)
    method.after_step(last, method.losses(last))  # the dense phase's last step: copied after it
    c = model.layer.cells
    for m in range(1, M):
        for name in ("weight_hh", "bias_ih"):
            src, diff = getattr(c[0], name), getattr(c[m], name) - getattr(c[0], name)
            rel = float(diff.pow(2).mean().sqrt() / src.pow(2).mean().sqrt())
            assert 0.005 < rel < 0.02, (name, rel)  # a copy plus noise of 1% of the tensor's RMS
    assert method.state()["upcycled"]
    assert method.losses(Window(x, y, h, 0, 0, 2)).aux  # then EM, with its controller loss


def test_prior_anneal(tiny_model_config):
    mcfg = tiny_model_config(vocab_size=V, modules=M, k=1)
    method = build(lm.ModularLM(mcfg), mcfg, TrainConfig(prior_weight=1.0, prior_anneal=10, warm_start=4), 1, 1)
    assert [method.prior_weight(s) for s in (0, 4, 9, 14, 100)] == [0.0, 0.0, 0.5, 1.0, 1.0]


def test_config_refuses_unknown_variants():
    with pytest.raises(ValueError, match="e_step 'viterbi' unknown"):
        TrainConfig(e_step="viterbi")
    with pytest.raises(ValueError, match="must not be negative"):
        TrainConfig(balance_rate=-1)
    assert ModelConfig(method="hash").exportable is False


def test_export_refuses_a_hash_checkpoint(tmp_path, tiny_corpus, tiny_model_config, tiny_train_config):
    from modrt._exceptions import ExportError
    from modrt.export.exporter import export
    from modrt.train.trainer import Trainer

    mcfg = tiny_model_config(method="hash")
    trainer = Trainer(mcfg, tiny_train_config(steps=2), tiny_corpus(), tmp_path / "run", progress=False)
    summary = trainer.fit()
    assert summary["modules_in_use"] >= 2  # the balanced table spreads the words
    with pytest.raises(ExportError, match="training baseline"):
        export(tmp_path / "run" / "ckpt.pt", tmp_path / "bundle", progress=False)


# --- the word E-step: a* is a word -> modules table --------------------------------------------


@pytest.mark.parametrize("k,samples,all_modules", [(1, M, True), (2, 3, False), (1, 2, False)])
def test_word_e_step_gains_are_one_step_changes_of_the_table(tiny_model_config, k, samples, all_modules):
    # hidden 300: M * H > 1024, so the step dispatches rows to modules (the path of large cells)
    model, x, y, h = _setup(tiny_model_config, k=k, **({} if all_modules else {"hidden": 300}))
    assert model.layer.compute_all == all_modules
    table = torch.rand(V, M, generator=torch.Generator().manual_seed(3)).argsort(1)[:, :k]
    g = em.word_e_step(model, x, y, h, table, samples, keys=torch.arange(B))
    C = k * (M - k) if samples - 1 >= k * (M - k) else samples - 1
    assert g.gain.shape == g.slot.shape == g.module.shape == (T, B, C)
    a = table[x]
    for t, b, c in [(0, 0, 0), (T - 1, B - 1, C - 1), (2, 3, C // 2)]:
        assert not (a[t, b] == g.module[t, b, c]).any()  # a module the word's entry does not hold
        changed = a.clone()
        changed[t, b, g.slot[t, b, c]] = g.module[t, b, c]
        # the brute force: the whole window re-run with that one position changed
        with torch.no_grad():
            ll = model.token_log_likelihood(model(x, h, lm.given(changed)).hs, y)
            ll0 = model.token_log_likelihood(model(x, h, lm.given(a)).hs, y)
        assert float(g.gain[t, b, c]) == pytest.approx(float(ll[t, b] - ll0[t, b]), abs=1e-4)
    if all_modules:  # every module scored at every position
        assert torch.equal(g.module.sort(-1).values, torch.stack([
            torch.tensor([m for m in range(M) if m != int(a[t, b, 0])]) for t in range(T) for b in range(B)
        ]).view(T, B, M - 1))
    # keyed draws are a function of the example keys alone
    again = em.word_e_step(model, x, y, h, table, samples, keys=torch.arange(B))
    assert torch.equal(again.module, g.module)


@pytest.mark.parametrize("all_modules", [True, False])
def test_word_e_step_with_the_m_steps_forward_and_subsampled_positions(tiny_model_config, all_modules):
    model, x, y, h = _setup(tiny_model_config, k=1, **({} if all_modules else {"hidden": 300}))
    table = torch.rand(V, M, generator=torch.Generator().manual_seed(3)).argsort(1)[:, :1]
    keys = torch.arange(B)
    full = em.word_e_step(model, x, y, h, table, 3, keys=keys)
    assert full.scored is None
    # the trajectory and log-likelihoods of a forward with gradient (the M-step's) give the same gains
    out, ll = model.run_scored(x, h, lm.given(table[x]), y)
    base = (out.hs.detach(), ll.detach(), out.log_probs.detach())
    reused = em.word_e_step(model, x, y, h, table, 3, keys=keys, base=base)
    assert torch.allclose(reused.gain, full.gain, atol=1e-5) and torch.equal(reused.module, full.module)
    joint = em.word_e_step(model, x, y, h, table, 3, keys=keys, prior_weight=0.5)
    assert torch.allclose(em.word_e_step(model, x, y, h, table, 3, keys=keys, base=base, prior_weight=0.5).gain,
                          joint.gain, atol=1e-5)
    # keep: word 0 never scored, words 1.. always, word 2 half the time
    keep = torch.ones(V)
    keep[0], keep[2] = 0.0, 0.5
    x[0, 0], x[1, 0] = 0, 1  # the window holds words 0 and 1
    full = em.word_e_step(model, x, y, h, table, 3, keys=keys)
    part = em.word_e_step(model, x, y, h, table, 3, keys=keys, keep=keep)
    assert part.scored.shape == (T, B)
    assert not part.scored[x == 0].any() and part.scored[(x != 0) & (x != 2)].all()
    assert torch.equal(part.module, full.module)  # the candidates do not depend on which are scored
    assert torch.allclose(part.gain[part.scored], full.gain[part.scored], atol=1e-5)
    assert (part.gain[~part.scored] == 0).all()
    again = em.word_e_step(model, x, y, h, table, 3, keys=keys, keep=keep)  # keyed: the same positions
    assert torch.equal(again.scored, part.scored)
    many = em.word_e_step(model, torch.full((T, 64), 2), y.repeat(1, 8), h.repeat(8, 1), table, 3,
                          keys=torch.arange(64), keep=keep)
    assert 0.3 < float(many.scored.float().mean()) < 0.7


@pytest.mark.parametrize("k", [1, 2])
def test_word_e_step_joint_score_adds_the_controllers_log_ratio(tiny_model_config, k):
    model, x, y, h = _setup(tiny_model_config, k=k)
    table = torch.rand(V, M, generator=torch.Generator().manual_seed(3)).argsort(1)[:, :k]
    keys = torch.arange(B)
    plain = em.word_e_step(model, x, y, h, table, 4, keys=keys)
    joint = em.word_e_step(model, x, y, h, table, 4, keys=keys, prior_weight=0.5)
    assert torch.equal(joint.module, plain.module) and torch.equal(joint.slot, plain.slot)
    with torch.no_grad():
        lp = model(x, h, lm.given(table[x])).log_probs  # (T, B, K, M) along a*
    a = table[x]
    for t, b, c in [(0, 0, 0), (T - 1, B - 1, 2), (2, 3, 1)]:
        s_, m_ = int(joint.slot[t, b, c]), int(joint.module[t, b, c])
        prior = float(lp[t, b, s_, m_] - lp[t, b, s_, a[t, b, s_]])  # log p(m | x, h) - log p(a*_t | x, h)
        assert float(joint.gain[t, b, c]) == pytest.approx(float(plain.gain[t, b, c]) + 0.5 * prior, abs=1e-4)
    # a controller sure of module M-1 makes every move into it a gain, whatever the likelihood says
    with torch.no_grad():
        model.layer.controller.bias.view(k, M)[:, M - 1] += 20.0
    below = torch.rand(V, M - 1, generator=torch.Generator().manual_seed(4)).argsort(1)[:, :k]  # never M-1
    sure = em.word_e_step(model, x, y, h, below, M * k, keys=keys, prior_weight=1.0)
    into = sure.module == M - 1
    assert into.any() and (sure.gain[into] > 5).all()


def test_word_em_with_one_sample_keeps_its_start(tiny_model_config):
    # S = 1: no candidate besides a*, so the hash-started table stays; the controller still learns it
    mcfg = tiny_model_config(vocab_size=V, modules=M, k=1, dropout=0.0)
    model = lm.ModularLM(mcfg)
    tokens = torch.randint(0, V, (4 * T + 1, B), generator=torch.Generator().manual_seed(2))
    method = build(model, mcfg, TrainConfig(bptt=T, batch_size=B, e_step="word", samples=1, a_star_init="hash"),
                   4 * B, T, tokens)
    start = method.table.clone()
    x, y = data.window(tokens, 0, T)
    losses = method.losses(Window(x, y, model.init_hidden(B), 0, 0, 0))
    assert losses.info["e_changed"] == 0 and torch.equal(method.table, start)
    assert float(losses.aux["controller"].detach()) > 0  # -log p(a*|x) is trained


@pytest.mark.parametrize("reuse", [True, False])
def test_word_em_order_of_e_and_m_step(tiny_model_config, reuse):
    # reuse: the M-step trains the table as the window found it (its moves apply from the next
    # window); --no-word-reuse: the E-step runs first and the M-step trains the moved table
    mcfg = tiny_model_config(vocab_size=V, modules=M, k=1, dropout=0.0)
    torch.manual_seed(0)
    model = lm.ModularLM(mcfg)
    tokens = torch.randint(0, 3, (4 * T + 1, B), generator=torch.Generator().manual_seed(2))  # 3 words, seen often
    tcfg = TrainConfig(bptt=T, batch_size=B, e_step="word", samples=M, word_subsample=0, word_reuse=reuse)
    method = build(model, mcfg, tcfg, 4 * B, T, tokens)
    start = method.table.clone()
    x, y = data.window(tokens, 0, T)
    w = Window(x, y, model.init_hidden(B), 0, 0, 0)
    losses = method.losses(w)
    assert losses.info["e_changed"] > 0 and not torch.equal(method.table, start)
    trained = start if reuse else method.table
    expect = em.m_step_of(model, w, trained[x])
    assert float(losses.total) == pytest.approx(float(expect.total), abs=1e-6)


def test_word_keep_thins_frequent_words_only():
    counts = torch.tensor([9000.0, 900.0, 90.0, 9.0, 1.0, 0.0])
    keep = em.word_keep(counts, t=0.01)
    share = counts / counts.sum()
    assert keep[0] == pytest.approx(float((0.01 / share[0]).sqrt()))  # sqrt(t / f)
    assert keep[0] < keep[1] < 1.0 and (keep[2:] == 1.0).all()  # the rare and the unseen: always scored
    assert em.word_keep(counts, t=0) is None  # 0: every position


def test_word_subsample_needs_the_word_e_step():
    assert TrainConfig(e_step="word", word_subsample=0).word_subsample == 0
    with pytest.raises(ValueError, match="word_subsample"):
        TrainConfig(e_step="window", word_subsample=0)
    with pytest.raises(ValueError, match="word_subsample"):
        TrainConfig(e_step="word", word_subsample=-1)
    with pytest.raises(ValueError, match="needs --e-step word"):
        TrainConfig(e_step="position", word_reuse=False)


def test_word_decide_moves_a_word_only_for_a_gain_seen_often_enough():
    K, Mw, Vw = 1, 3, 4
    table = torch.tensor([[0], [1], [2], [0]])
    gain, square, seen = (torch.zeros(Vw, K, Mw) for _ in range(3))

    def scored(w, m, gains):
        gain[w, 0, m], square[w, 0, m], seen[w, 0, m] = sum(gains), sum(g * g for g in gains), len(gains)

    scored(0, 2, [0.5, 0.5, 0.5])  # word 0: +0.5 per occurrence for module 2, no spread -> moves
    scored(0, 1, [0.1, 0.1])  # ... a smaller gain for module 1 -> not taken
    scored(1, 0, [-1.0, -2.0])  # word 1: a loss -> stays
    scored(2, 1, [4.0])  # word 2: a gain seen once -> stays (too few)
    scored(3, 1, [4.0, 4.0])  # word 3: a gain, but not in this window -> stays
    words = torch.tensor([True, True, True, False])
    change = em.word_decide(table, gain, square, seen, words)
    assert change.tolist() == [True, False, False, False]
    assert table.flatten().tolist() == [2, 1, 2, 0]
    # a positive mean within its noise (+1, -0.6: mean 0.2, standard error 0.8) is not taken
    table = torch.tensor([[0], [1], [2], [0]])
    scored(0, 2, [1.0, -0.6])
    scored(0, 1, [0.3, -0.3])
    assert not em.word_decide(table, gain, square, seen, words).any()
    # the balancing bias: module 2 is over-used, so word 0's steady +0.5 for it no longer pays
    scored(0, 2, [0.5, 0.5, 0.5])
    change = em.word_decide(table, gain, square, seen, words, bias=torch.tensor([0.0, 0.0, -0.6]))
    assert not change.any() and table.flatten().tolist() == [0, 1, 2, 0]


def test_word_em_trains_on_the_table_and_moves_words(tiny_model_config):
    # A text where the next word depends on a hidden group of the input word: the table starts
    # at random, and the E-step changes entries; a* is always the table's entry (per word).
    mcfg = tiny_model_config(vocab_size=V, modules=M, k=1, dropout=0.0)
    model = lm.ModularLM(mcfg)
    tokens = torch.randint(0, V, (4 * T + 1, B), generator=torch.Generator().manual_seed(2))
    tcfg = TrainConfig(bptt=T, batch_size=B, e_step="word", samples=M, balance_rate=0.1)
    method = build(model, mcfg, tcfg, 4 * B, T, tokens)
    start = method.table.clone()
    assert method.memory is None and start.shape == (V, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    moved = 0
    for step in range(12):
        wi = step % 4
        x, y = data.window(tokens, wi, T)
        before = method.table.clone()
        losses = method.losses(Window(x, y, model.init_hidden(B), wi, step // 4, step))
        assert torch.equal(losses.out.a, before[x])  # the M-step follows the table; moves apply next window
        moved += losses.info["e_changed"]
        opt.zero_grad()
        losses.total.backward()
        opt.step()
    assert moved > 0 and not torch.equal(method.table, start)
    assert method.bias.abs().sum() > 0  # the balancing bias moved
    state = method.state()
    fresh = build(lm.ModularLM(mcfg), mcfg, tcfg, 4 * B, T, tokens)
    fresh.load_state(state)
    assert torch.equal(fresh.table, method.table) and torch.equal(fresh.gain, method.gain)


def test_word_e_step_refusals(tiny_model_config):
    from modrt.train import conv
    from modrt.train.config import ImageModelConfig

    icfg = ImageModelConfig(channels=(4,), modules=2)
    with pytest.raises(ValueError, match="no meaning for images"):
        build(conv.ModularConvNet(icfg), icfg, TrainConfig(e_step="word"), 10, 1)
    mcfg = tiny_model_config(vocab_size=V, modules=2, k=2)
    with pytest.raises(ValueError, match="no other"):
        build(lm.ModularLM(mcfg), mcfg, TrainConfig(e_step="word"), 1, T, torch.zeros(7, 1, dtype=torch.long))


def test_word_decide_capacity_keeps_every_module_within_its_share():
    # 4 words of 10 tokens each on 2 modules: 20 / 20. Every word gains from module 0, but
    # a cap of 1.5 x the even share (30 tokens) lets only the best gainer move there.
    table = torch.tensor([[0], [0], [1], [1]])
    gain, square, seen = (torch.zeros(4, 1, 2) for _ in range(3))
    for w, g in [(2, 0.9), (3, 0.5)]:
        gain[w, 0, 0], square[w, 0, 0], seen[w, 0, 0] = 3 * g, 3 * g * g, 3
    counts = torch.full((4,), 10.0, dtype=torch.double)
    load = torch.tensor([20.0, 20.0], dtype=torch.double)
    change = em.word_decide(table, gain, square, seen, torch.ones(4, dtype=torch.bool), capacity=(counts, load, 1.5))
    assert change.tolist() == [False, False, True, False]
    assert table.flatten().tolist() == [0, 0, 0, 1] and load.tolist() == [30.0, 10.0]
    # uncapped, both move
    table = torch.tensor([[0], [0], [1], [1]])
    assert em.word_decide(table, gain, square, seen, torch.ones(4, dtype=torch.bool)).sum() == 2
    with pytest.raises(ValueError, match="needs --e-step word or window"):
        TrainConfig(e_step="position", capacity=1.2)
    with pytest.raises(ValueError, match="a value >= 1"):
        TrainConfig(capacity=0.5)


def test_capped_pick_moves_examples_best_gain_first_within_the_cap():
    # Two layers of 2 modules; a memory of 8 examples, 4 / 4 on each module in each layer
    # (cap 1.25 x 4 = 5). The batch: 3 examples on module 1 in layer 0 whose best candidate
    # moves them to module 0 there; only one more fits, so the largest gain (example 1) moves,
    # example 2 takes its second candidate (no rise in layer 0), example 0 keeps a*.
    P, B, K = 2, 3, 1
    stored = torch.tensor([[1, 1, 1], [0, 0, 0]]).view(P, B, K)
    to_zero = torch.tensor([[0, 0, 0], [0, 0, 0]]).view(P, B, K)  # layer 0 -> module 0
    other = torch.tensor([[1, 1, 1], [1, 1, 1]]).view(P, B, K)  # layer 1 -> module 1
    cands = torch.stack([stored, to_zero, other])  # (S, P, B, K)
    scores = torch.tensor([[0.0, 0.0, 0.0], [1.0, 3.0, 2.0], [-1.0, -1.0, 0.5]])
    load = torch.tensor([[4.0, 4.0], [4.0, 4.0]], dtype=torch.double)
    pick = em.capped_pick(scores, cands, load, 1.25)
    assert pick.tolist() == [0, 1, 2]
    assert load.tolist() == [[5.0, 3.0], [3.0, 5.0]]  # 1 moved in layer 0, 1 in layer 1
    # Uncapped (a cap no load reaches), every example takes its best candidate.
    load = torch.tensor([[4.0, 4.0], [4.0, 4.0]], dtype=torch.double)
    assert em.capped_pick(scores, cands, load, 10.0).tolist() == [1, 1, 1]
    # Leaving a module, or staying in an over-full one, is always allowed.
    load = torch.tensor([[1.0, 7.0], [6.0, 2.0]], dtype=torch.double)  # cap 4: layer 1's module 0 over it
    assert em.capped_pick(scores, cands, load, 1.0).tolist() == [1, 1, 1]
    assert load.tolist() == [[4.0, 4.0], [6.0, 2.0]]
    # group_counts: one group counts every position; else one row per position.
    a = torch.tensor([[[0], [1]], [[1], [1]]])  # (N=2, P=2, K=1)
    assert em.group_counts(a, 1, 2).tolist() == [[1.0, 3.0]]
    assert em.group_counts(a, 2, 2).tolist() == [[1.0, 1.0], [0.0, 2.0]]
