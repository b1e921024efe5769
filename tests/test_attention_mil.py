"""Attention MIL (``magnet_zoo.train.attention_mil``): the first map trained from slide labels alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import micro_magnet, tissue_image

from magnet_zoo.config import ConfigError
from magnet_zoo.train import Recipe, SourceData, TrainConfig, fit, get_recipe
from magnet_zoo.train.attention_mil import attention_mil_loss, mil_bce, top_share_mean
from magnet_zoo.wsi import ArraySource, SlideFetcher


def test_top_share_mean_runs_from_max_to_mean_over_the_mask_only():
    logits = torch.tensor([[[1.0, 2.0], [3.0, 10.0]]])  # (1, 2, 2)
    mask = torch.tensor([[[True, True], [True, False]]])  # 10 is glass
    assert float(top_share_mean(logits, mask, 0.01)) == pytest.approx(3.0)  # the largest on tissue
    assert float(top_share_mean(logits, mask, 1.0)) == pytest.approx(2.0)  # the tissue mean
    assert float(top_share_mean(logits, mask, 0.5)) == pytest.approx(2.5)  # ceil(0.5 * 3) = 2 largest
    assert float(top_share_mean(logits, None, 0.25)) == pytest.approx(10.0)
    nothing = torch.zeros_like(mask)
    assert float(top_share_mean(logits, nothing, 1.0)) == pytest.approx(4.0)  # no tissue: every pixel
    batch = torch.randn(3, 2, 5, 5)
    assert top_share_mean(batch, batch > 0, 0.1).shape == (3, 2)
    with pytest.raises(ValueError, match="top"):
        top_share_mean(logits, mask, 0.0)
    with pytest.raises(ValueError, match="shape"):
        top_share_mean(logits, mask[:, :1], 0.5)


def test_mil_bce_pools_tumour_slides_and_with_all_negatives_trains_every_normal_tissue_pixel():
    logits = torch.tensor([[[[4.0, 0.0], [0.0, 9.0]]], [[[-1.0, 2.0], [-3.0, 8.0]]]])  # (2 slides, 1 map, 2, 2)
    mask = torch.tensor([[[[True, True], [True, False]]], [[[True, True], [True, False]]]])  # 9 and 8: glass
    labels = torch.tensor([1.0, 0.0])
    top, pooled = mil_bce(logits, mask, labels, top=0.3)  # ceil(0.3 * 3) = 1: the largest tissue logit
    torch.testing.assert_close(pooled, torch.tensor([[4.0], [2.0]]))
    softplus = torch.nn.functional.softplus  # BCE with logits: softplus(-x) against 1, softplus(x) against 0
    torch.testing.assert_close(top, (softplus(torch.tensor(-4.0)) + softplus(torch.tensor(2.0))) / 2)
    every, _ = mil_bce(logits, mask, labels, top=0.3, negatives="all")
    normal = softplus(torch.tensor([-1.0, 2.0, -3.0])).mean()  # the three tissue pixels
    torch.testing.assert_close(every, (softplus(torch.tensor(-4.0)) + normal) / 2)
    grad_logits = logits.clone().requires_grad_()
    mil_bce(grad_logits, mask, labels, top=0.3, negatives="all")[0].backward()
    assert (grad_logits.grad[1, 0][mask[1, 0]] > 0).all()  # every normal tissue pixel is pushed down
    assert grad_logits.grad[1, 0, 1, 1] == 0  # not the glass
    assert int((grad_logits.grad[0, 0] != 0).sum()) == 1  # the tumour slide: only its pooled pixel
    with pytest.raises(ValueError, match="negatives"):
        mil_bce(logits, mask, labels, top=0.3, negatives="some")


def test_only_the_first_layers_attention_gets_the_gradient():
    img = tissue_image(1500, 1500)
    fetchers = [SlideFetcher(ArraySource(img), 15), SlideFetcher(ArraySource(img[::-1].copy()), 15)]
    net = micro_magnet(attention_tissue_only=True).train()
    loss, pooled = attention_mil_loss(net, fetchers, torch.tensor([1.0, 0.0]), top=0.05)
    assert pooled.shape == (2, net.layers[0].num_stacks)
    loss.backward()
    first = [p for p in net.layers[0].parameters() if p.requires_grad]
    assert first and all(p.grad is not None for p in first)
    assert any(float(p.grad.abs().sum()) > 0 for p in first)
    others = [p for name, p in net.named_parameters() if not name.startswith("layers.0.")]
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in others)


def _spotted(seed: int, spot: bool) -> tuple[np.ndarray, tuple[int, int] | None]:
    """Tissue; with ``spot`` a dark-blue square (a 'tumour') at a random place on it, and its centre."""
    rng = np.random.default_rng(seed)
    img = tissue_image(1200, 1200, seed=seed)
    if not spot:
        return img, None
    while True:
        y, x = (int(v) for v in rng.integers(300, 900, size=2))
        if (img[y, x] < 240).all():
            break
    img[y - 60:y + 60, x - 60:x + 60] = (60, 40, 140)
    return img, (y, x)


def test_the_map_learns_to_peak_on_the_evidence_from_slide_labels_alone():
    """Positive slides hold a small dark square somewhere on their tissue, negative slides none. Trained only
    on the pooled slide logit, the first map's highest tissue pixel moves onto the square of held-out
    slides (before training it is there no more often than chance)."""
    def fetchers(seeds, spots):
        made = [_spotted(s, p) for s, p in zip(seeds, spots, strict=True)]
        return [SlideFetcher(ArraySource(img), 15) for img, _ in made], [c for _, c in made]

    train_f, _ = fetchers(range(12), [i % 2 == 0 for i in range(12)])
    labels = torch.tensor([float(i % 2 == 0) for i in range(12)])
    test_f, centres = fetchers(range(100, 106), [True] * 6)
    net = micro_magnet(attention_tissue_only=True).train()
    layer = net.layers[0]

    def hits() -> int:
        layer.eval()
        with torch.no_grad():
            view = net.whole_slide_view(test_f, torch.device("cpu"))[0]
            logits = layer.attention_logits(view)[:, 0]
            tissue = layer.tissue_mask(view)[:, 0]
        layer.train()
        n = 0
        for m, t, (y, x) in zip(logits, tissue, centres, strict=True):
            r, c = divmod(int(m.masked_fill(~t, float("-inf")).argmax()), m.shape[-1])
            side = 1200 / m.shape[-1]  # level-0 px per view px (square slides: no padding)
            n += abs((r + 0.5) * side - y) <= 90 and abs((c + 0.5) * side - x) <= 90
        return n

    before = hits()
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        idx = torch.randperm(12, generator=gen)[:6].tolist()
        loss, _ = attention_mil_loss(net, [train_f[i] for i in idx], labels[idx], top=0.02)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = hits()
    assert before <= 2 and after >= 5, (before, after)


def test_the_recipe_field_is_validated_and_the_loop_logs_the_term():
    with pytest.raises(ConfigError, match="attention_mil"):
        get_recipe("learn_to_look", attention_mil_weight=-1.0)
    with pytest.raises(ConfigError, match="attention_mil"):
        get_recipe("learn_to_look", attention_mil_top=0.0)
    with pytest.raises(ConfigError, match="attention_mil_negatives"):
        get_recipe("learn_to_look", attention_mil_negatives="none")
    recipe = get_recipe("learn_to_look", attention_mil_weight=1.0, attention_mil_top=0.05, steps=4, batch_size=2,
                        head_warmup=0.5)
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    sources = [ArraySource(_spotted(s, s % 2 == 0)[0]) for s in range(4)]
    config = TrainConfig(device="cpu", amp="off", threads=2, progress=False, baseline_eval=False, save_every=0,
                         log_every=1, tensorboard=False)
    result = fit(micro_magnet(attention_tissue_only=True), SourceData(sources, [1, 0, 1, 0]), config, recipe)
    assert len(result.log) == 4  # two steps of head warm-up, two attended: the term in every one
    assert all(np.isfinite(row["attention_mil"]) and row["attention_mil"] > 0 for row in result.log)
    plain = fit(micro_magnet(attention_tissue_only=True), SourceData(sources, [1, 0, 1, 0]), config,
                recipe.replace(attention_mil_weight=0.0))
    assert all(row.get("attention_mil", 0) == 0 for row in plain.log)


@pytest.fixture(scope="module")
def slide_files(tmp_path_factory):
    """Four small SynthMets slides on disk (macro and normal): ``(paths, labels)``."""
    import csv

    from magnet_zoo.synth import generate_dataset

    root = tmp_path_factory.mktemp("attention_pretrain")
    table = generate_dataset(root, n=4, size=2048, seed=1, categories=("macro", "normal"), progress=False, workers=1)
    rows = list(csv.DictReader(table.open()))
    return [str(root / r["path"]) for r in rows], [int(r["label"]) for r in rows]


def test_pretraining_reads_each_view_as_the_forward_does_and_trains_the_first_layer_only(slide_files):
    from magnet_zoo.train.attention_mil import pretrain_attention, read_views
    from magnet_zoo.wsi import SlideFetcher, open_slide

    paths, labels = slide_files
    assert set(labels) == {0, 1}
    net = micro_magnet(attention_tissue_only=True)
    views = read_views(net, paths)
    assert views.shape == (4, 1, 3, 56, 56)
    with open_slide(paths[2]) as src:
        torch.testing.assert_close(views[2], net.whole_slide_view([SlideFetcher(src, 15)], torch.device("cpu"))[0][0])
    before = {k: v.clone() for k, v in net.state_dict().items()}
    done = pretrain_attention(net, paths, labels, steps=5, lr=1e-2, top=0.1, seed=0, batch=4)
    assert done["steps"] == 5 and done["slides"] == 4 and np.isfinite(done["loss_last_50"])
    assert done["loss_per_50_steps"] == [pytest.approx(done["loss_first_50"])]  # one block of 5 steps
    changed = {k for k, v in net.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("layers.0.stacks.") for k in changed)
    assert all(p.grad is None for p in net.parameters())  # no stale gradient for the loop's first step
    assert pretrain_attention(net, paths, labels, steps=0, lr=1e-2, top=0.1, seed=0) == {"seconds": 0.0, "steps": 0}
    with pytest.raises(ValueError, match="both classes"):
        pretrain_attention(net, paths[:1], [1], steps=1, lr=1e-2, top=0.1, seed=0)


def test_the_loop_runs_the_phase_once_and_refuses_data_without_files(slide_files, tmp_path):
    from magnet_zoo.train import SlideData
    from magnet_zoo.train.data import SlideRecord

    with pytest.raises(ConfigError, match="attention_pretrain_steps"):
        get_recipe("learn_to_look", attention_pretrain_steps=-1)
    recipe = get_recipe("learn_to_look", attention_pretrain_steps=3, attention_mil_top=0.1, steps=2, batch_size=2)
    config = TrainConfig(device="cpu", amp="off", threads=2, progress=False, baseline_eval=False, save_every=0,
                         log_every=1, tensorboard=False)
    paths, labels = slide_files
    records = [SlideRecord(p, y, "macro" if y else "normal") for p, y in zip(paths, labels, strict=True)]
    result = fit(micro_magnet(attention_tissue_only=True), SlideData(records, num_workers=0), config, recipe)
    assert result.attention_pretrain["steps"] == 3 and result.attention_pretrain["slides"] == 4
    assert result.global_step == 2
    sources = [ArraySource(_spotted(s, s % 2 == 0)[0]) for s in range(2)]
    with pytest.raises(ConfigError, match="must be slides"):
        fit(micro_magnet(), SourceData(sources, [1, 0]), config, recipe)


def test_attention_mil_only_leaves_the_first_map_to_the_mil_term_alone(monkeypatch):
    import magnet_zoo.train.attention_mil as attention_mil

    with pytest.raises(ConfigError, match="attention_mil_only"):
        get_recipe("learn_to_look", attention_mil_only=True)
    real = attention_mil.attention_mil_loss

    def no_gradient(*args, **kwargs):  # the MIL term, connected to the stacks but with a zero gradient
        loss, pooled = real(*args, **kwargs)
        return 0.0 * loss, pooled

    monkeypatch.setattr(attention_mil, "attention_mil_loss", no_gradient)
    sources = [ArraySource(_spotted(s, s % 2 == 0)[0]) for s in range(4)]
    config = TrainConfig(device="cpu", amp="off", threads=2, progress=False, baseline_eval=False, save_every=0,
                         log_every=1, tensorboard=False)
    moved = {}
    for only in (False, True):
        recipe = get_recipe("learn_to_look", attention_mil_weight=1.0, attention_mil_only=only, steps=3,
                            batch_size=2, revive_at=())
        torch.manual_seed(0)
        net = micro_magnet(attention_tissue_only=True)
        before = {k: v.detach().clone() for k, v in net.named_parameters()}  # parameters: norms' statistics move
        fit(net, SourceData(sources, [1, 0, 1, 0]), config, recipe)
        moved[only] = {k for k, v in net.named_parameters() if not torch.equal(v, before[k])}
        assert all(p.requires_grad for p in net.parameters())  # restored after every step
    first = {k for k in moved[False] if k.startswith("layers.0.stacks.")}
    assert first, "the heads' losses move the first map through the crops"
    assert not any(k.startswith("layers.0.stacks.") for k in moved[True])
    assert any(k.startswith("layers.1.") or k.startswith("classifier") for k in moved[True])


def test_with_the_weight_at_zero_the_first_map_learns_in_the_phase_only(slide_files, monkeypatch):
    import magnet_zoo.train.attention_mil as attention_mil
    from magnet_zoo.train import SlideData
    from magnet_zoo.train.data import SlideRecord

    real, after, augments = attention_mil.pretrain_attention, {}, []

    def snapshot(model, *args, **kwargs):
        augments.append((kwargs.get("augment"), kwargs.get("candidates"), kwargs.get("edges")))
        done = real(model, *args, **kwargs)
        after.update({k: v.detach().clone() for k, v in model.named_parameters() if k.startswith("layers.0.stacks.")})
        return done

    monkeypatch.setattr(attention_mil, "pretrain_attention", snapshot)
    recipe = get_recipe("learn_to_look", attention_pretrain_steps=3, attention_mil_only=True, attention_mil_top=0.1,
                        steps=3, batch_size=2, head_warmup=0.0, revive_at=(), attention_pretrain_augment="flips",
                        attention_pretrain_candidates=2, attention_mil_edges="negative")
    assert recipe.attention_mil_weight == 0
    config = TrainConfig(device="cpu", amp="off", threads=2, progress=False, baseline_eval=False, save_every=0,
                         log_every=1, tensorboard=False)
    paths, labels = slide_files
    records = [SlideRecord(p, y, "macro" if y else "normal") for p, y in zip(paths, labels, strict=True)]
    torch.manual_seed(0)
    net = micro_magnet(attention_tissue_only=True)
    before = {k: v.detach().clone() for k, v in net.named_parameters()}
    result = fit(net, SlideData(records, num_workers=0), config, recipe)
    assert result.global_step == 3 and after
    assert augments == [("flips", 2, "negative")]  # the recipe's fields reach the phase
    assert any(not torch.equal(after[k], before[k]) for k in after)  # the phase trained the first map
    assert all(torch.equal(v, after[k]) for k, v in net.named_parameters() if k in after)  # the loop did not
    assert any(not torch.equal(v, before[k]) for k, v in net.named_parameters() if k.startswith("layers.1."))
    assert "attention_mil" not in result.log[-1]


@pytest.mark.parametrize("augment", ["d4", "flips"])
def test_the_phase_orients_each_batch_by_its_augment_and_flips_never_transpose(augment, monkeypatch):
    import magnet_zoo.train.attention_mil as attention_mil
    from magnet_zoo.train.head_pretrain import d4

    base = torch.rand(1, 3, 56, 56)  # one asymmetric view for every slide: each batch shows its orientation
    monkeypatch.setattr(attention_mil, "read_views", lambda model, paths: base.expand(len(paths), 1, 3, 56, 56).clone())
    net = micro_magnet(attention_tissue_only=False)
    layer, seen = net.layers[0], []
    real = layer.attention_logits

    def record(x, stacks=None):
        seen.append(x[0].detach().clone())
        return real(x, stacks)

    monkeypatch.setattr(layer, "attention_logits", record)
    attention_mil.pretrain_attention(net, ["a", "b", "c", "d"], [1, 0, 1, 0], steps=40, lr=1e-3, top=0.1, seed=0,
                                     batch=4, augment=augment)
    orientations = {k for x in seen for k in range(8) if torch.equal(x, d4(base, k))}
    mirrorings = {k for k in range(4) if any(torch.equal(x, attention_mil.mirror(base, k)) for x in seen)}
    assert all(any(torch.equal(x, d4(base, k)) for k in range(8)) for x in seen)
    if augment == "flips":
        assert mirrorings == {0, 1, 2, 3} and all(any(torch.equal(x, attention_mil.mirror(base, k)) for k in range(4))
                                                  for x in seen)
    else:
        assert len(orientations) == 8  # transposed views too
    with pytest.raises(ValueError, match="augment"):
        attention_mil.pretrain_attention(net, ["a", "b"], [1, 0], steps=1, lr=1e-3, top=0.1, seed=0, augment="turns")
    with pytest.raises(ConfigError, match="attention_pretrain_augment"):
        get_recipe("learn_to_look", attention_pretrain_augment="turns")


def test_the_held_out_slides_are_a_share_of_each_class_and_never_trained_on():
    from magnet_zoo.train.attention_mil import holdout_split

    labels = torch.tensor([1.0] * 10 + [0.0] * 5)
    train, held = holdout_split(labels, 0.2, torch.Generator().manual_seed(0))
    assert sorted(train.tolist() + held.tolist()) == list(range(15))
    assert int((labels[held] > 0).sum()) == 2 and int((labels[held] == 0).sum()) == 1
    other = holdout_split(labels, 0.2, torch.Generator().manual_seed(1))[1]
    assert not torch.equal(held, other)  # drawn, not the first of each class
    few = holdout_split(torch.tensor([1.0, 1.0, 0.0, 0.0]), 0.9, torch.Generator().manual_seed(0))
    assert len(few[0]) == 2 and len(few[1]) == 2  # at least one of each class left to train on
    with pytest.raises(ValueError, match="two training slides of each class"):
        holdout_split(torch.tensor([1.0, 0.0, 0.0]), 0.2, torch.Generator())
    with pytest.raises(ValueError, match="share"):
        holdout_split(labels, 1.0, torch.Generator())


@pytest.mark.parametrize("winner", [0, 2])
def test_candidates_train_side_by_side_and_the_best_on_held_out_slides_is_kept(winner, monkeypatch):
    import magnet_zoo.train.attention_mil as attention_mil
    import magnet_zoo.train.metrics as metrics

    views = torch.stack([torch.from_numpy(_spotted(s, s % 2 == 0)[0]).permute(2, 0, 1).float()
                         for s in range(10)]).div(127.5).sub(1).unsqueeze(1)
    views = torch.nn.functional.interpolate(views[:, 0], size=(56, 56), mode="area").unsqueeze(1)
    labels = [int(s % 2 == 0) for s in range(10)]
    monkeypatch.setattr(attention_mil, "read_views", lambda model, paths: views[: len(paths)].clone())
    torch.manual_seed(0)
    net = micro_magnet(attention_tissue_only=True)
    maps, calls = net.layers[0].num_stacks, []

    def fake_auroc(scores, y):  # called once per map of each candidate in turn: the winner's maps score higher
        calls.append(0)
        return 0.9 if (len(calls) - 1) // maps == winner else 0.6

    monkeypatch.setattr(metrics, "auroc", fake_auroc)
    done = attention_mil.pretrain_attention(net, [str(i) for i in range(10)], labels, steps=6, lr=1e-2, top=0.1,
                                            seed=0, batch=4, candidates=3)
    assert done["kept"] == winner and len(done["candidates"]) == 3 and done["held_out_slides"] == 2
    assert all(p.grad is None for p in net.parameters())
    losses = [c["held_out_loss"] for c in done["candidates"]]
    assert len(set(losses)) == 3  # three different maps were trained
    layer = net.layers[0]
    layer.eval()
    with torch.no_grad():  # the layer now holds the kept map: its held-out loss is the winner's
        held = [i for i in range(10) if i not in _trained_slides(labels)]
        x = views[held]
        y = torch.tensor([float(labels[i]) for i in held])
        loss, _ = mil_bce(layer.attention_logits(x), layer.tissue_mask(x), y, top=0.1)
    assert float(loss) == pytest.approx(losses[winner], rel=1e-5)
    with pytest.raises(ValueError, match="candidates"):
        attention_mil.pretrain_attention(net, ["a", "b"], [1, 0], steps=1, lr=1e-3, top=0.1, seed=0, candidates=0)
    with pytest.raises(ConfigError, match="attention_pretrain_candidates"):
        get_recipe("learn_to_look", attention_pretrain_candidates=0)


def _trained_slides(labels: list[int]) -> list[int]:
    """The slides :func:`pretrain_attention` trains on at seed 0 (its generator's first draw is the split)."""
    from magnet_zoo.train.attention_mil import holdout_split

    return holdout_split(torch.tensor([float(v) for v in labels]), 0.2, torch.Generator().manual_seed(41))[0].tolist()


def test_the_tissue_edge_is_never_pooled_and_always_pushed_down():
    from magnet_zoo.train.attention_mil import tissue_edge

    mask = torch.zeros(1, 1, 6, 6, dtype=torch.bool)
    mask[..., 1:5, 1:5] = True  # a 4x4 block of tissue: its ring is the edge, its 2x2 centre the inside
    edge = tissue_edge(mask)
    assert int(edge.sum()) == 12 and not edge[..., 2:4, 2:4].any() and edge[..., 1, 1:5].all()
    full = tissue_edge(torch.ones(6, 6, dtype=torch.bool))
    assert int(full.sum()) == 20 and not full[1:5, 1:5].any()  # the view's border counts as edge
    logits = torch.zeros(2, 1, 6, 6)
    logits[..., 1, 1] = 50.0  # a huge logit on the edge
    logits[..., 2, 2] = 1.0
    logits.requires_grad_(True)
    masks = mask.expand(2, 1, 6, 6)
    _, pooled = mil_bce(logits, masks, torch.tensor([1.0, 0.0]), top=0.25)
    assert float(pooled.detach()[0, 0]) > 10  # pooled, the edge decides the slide
    loss, pooled = mil_bce(logits, masks, torch.tensor([1.0, 0.0]), top=0.25, edges="negative")
    assert float(pooled.detach()[0, 0]) == pytest.approx(1.0)  # top quarter of the 2x2 inside: the 1.0 pixel
    loss.backward()
    assert (logits.grad[:, 0][edge[0, 0].expand(2, 6, 6)] > 0).all()  # every edge pixel of both slides pushed down
    assert float(logits.grad[0, 0, 2, 2]) < 0 and float(logits.grad[1, 0, 2, 2]) > 0
    alledge = torch.zeros(1, 1, 6, 6, dtype=torch.bool)
    alledge[..., 0, :] = True  # tissue only on the border: nothing inside, so the edge is pooled
    _, pooled = mil_bce(torch.arange(36.0).view(1, 1, 6, 6), alledge, torch.tensor([1.0]), top=1 / 6, edges="negative")
    assert float(pooled) == 5.0
    with pytest.raises(ValueError, match="tissue mask"):
        mil_bce(logits, None, torch.tensor([1.0, 0.0]), top=0.25, edges="negative")
    with pytest.raises(ValueError, match="edges"):
        mil_bce(logits, masks, torch.tensor([1.0, 0.0]), top=0.25, edges="drop")
    with pytest.raises(ConfigError, match="attention_mil_edges"):
        get_recipe("learn_to_look", attention_mil_edges="drop")
    with pytest.raises(ValueError, match="attention_tissue_only"):
        import magnet_zoo.train.attention_mil as attention_mil

        attention_mil.pretrain_attention(micro_magnet(attention_tissue_only=False), ["a", "b"], [1, 0], steps=1,
                                         lr=1e-3, top=0.1, seed=0, edges="negative")
    recipe = get_recipe("learn_to_look", attention_mil_weight=1.0, attention_mil_edges="negative", steps=1,
                        batch_size=2)
    config = TrainConfig(device="cpu", amp="off", threads=1, progress=False, baseline_eval=False, save_every=0,
                         tensorboard=False)
    sources = [ArraySource(_spotted(s, s % 2 == 0)[0]) for s in range(2)]
    with pytest.raises(ConfigError, match="attention_tissue_only"):  # before any step, not at the first
        fit(micro_magnet(attention_tissue_only=False), SourceData(sources, [1, 0]), config, recipe)


def test_attention_mil_on_several_first_layer_maps_is_warned_about(caplog):
    """Measured to work with one first-layer map only: a first layer with two learned maps is warned about,
    one with one map is not."""
    import logging

    sources, labels = [ArraySource(np.zeros((64, 64, 3), np.uint8))] * 2, [1, 0]
    config = TrainConfig(device="cpu", amp="off", threads=1, progress=False, baseline_eval=False, save_every=0,
                         tensorboard=False)
    recipe = get_recipe("learn_to_look_mil", steps=1, batch_size=2)
    for patches, warned in (((2, 2), True), ((1, 2), False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="magnet_zoo.train.loop"), pytest.raises(ConfigError,
                                                                                            match="slides"):
            fit(micro_magnet(attention_tissue_only=True, patches=patches), SourceData(sources, labels), config, recipe)
        assert ("Prefer one first-layer patch" in caplog.text) is warned, patches


def test_the_phase_pools_wide_first_and_narrows_to_the_top_share_over_its_first_half(monkeypatch):
    import magnet_zoo.train.attention_mil as attention_mil
    from magnet_zoo.train.attention_mil import annealed_top

    assert annealed_top(0, 1000, 0.1, 1.0) == pytest.approx(1.0)
    assert annealed_top(250, 1000, 0.1, 1.0) == pytest.approx(0.1 ** 0.5)  # geometric: halfway in log
    assert annealed_top(500, 1000, 0.1, 1.0) == pytest.approx(0.1)
    assert annealed_top(900, 1000, 0.1, 1.0) == pytest.approx(0.1)
    assert annealed_top(0, 1000, 0.1, None) == 0.1 and annealed_top(0, 1000, 0.1, 0.1) == 0.1
    shares = [annealed_top(t, 100, 0.1, 1.0) for t in range(100)]
    assert all(a > b for a, b in zip(shares[:50], shares[1:51], strict=True))  # strictly narrowing, then flat
    with pytest.raises(ValueError, match="start"):
        annealed_top(0, 10, 0.1, 1.5)

    seen = []
    real = attention_mil.mil_bce

    def record(logits, mask, labels, *, top, **kw):
        seen.append(top)
        return real(logits, mask, labels, top=top, **kw)

    monkeypatch.setattr(attention_mil, "mil_bce", record)
    monkeypatch.setattr(attention_mil, "read_views", lambda model, paths: torch.rand(len(paths), 1, 3, 56, 56))
    net = micro_magnet(attention_tissue_only=False)
    done = attention_mil.pretrain_attention(net, ["a", "b", "c", "d"], [1, 0, 1, 0], steps=10, lr=1e-3, top=0.1,
                                            seed=0, batch=4, top_start=1.0)
    assert seen == pytest.approx([annealed_top(t, 10, 0.1, 1.0) for t in range(10)])
    assert done["top_start"] == 1.0 and done["top"] == 0.1
    with pytest.raises(ValueError, match="start"):
        attention_mil.pretrain_attention(net, ["a", "b"], [1, 0], steps=1, lr=1e-3, top=0.1, seed=0, top_start=0.0)
    with pytest.raises(ConfigError, match="attention_pretrain_top_start"):
        get_recipe("learn_to_look", attention_pretrain_steps=5, attention_mil_top=0.1,
                   attention_pretrain_top_start=0.05)


def test_the_loop_hands_the_recipes_starting_share_to_the_phase(slide_files, monkeypatch):
    import magnet_zoo.train.attention_mil as attention_mil
    from magnet_zoo.train import SlideData
    from magnet_zoo.train.data import SlideRecord

    got = {}
    real = attention_mil.pretrain_attention

    def spy(*args, **kw):
        got.update(kw)
        return real(*args, **kw)

    monkeypatch.setattr(attention_mil, "pretrain_attention", spy)
    recipe = get_recipe("learn_to_look", attention_pretrain_steps=2, attention_mil_top=0.1,
                        attention_pretrain_top_start=1.0, steps=1, batch_size=2)
    config = TrainConfig(device="cpu", amp="off", threads=2, progress=False, baseline_eval=False, save_every=0,
                         tensorboard=False)
    paths, labels = slide_files
    records = [SlideRecord(p, y, "macro" if y else "normal") for p, y in zip(paths, labels, strict=True)]
    result = fit(micro_magnet(attention_tissue_only=True), SlideData(records, num_workers=0), config, recipe)
    assert got["top_start"] == 1.0 and got["top"] == 0.1 and got["edge_start"] == recipe.attention_pretrain_edge_start
    assert got["restarts"] == 0 and got["plateau"] == recipe.attention_pretrain_plateau and got["time_left"] is None
    assert result.attention_pretrain["top_start"] == 1.0
    got.clear()
    recipe = get_recipe("learn_to_look", attention_pretrain_steps=2, attention_mil_top=0.1, steps=1, batch_size=2,
                        attention_pretrain_restarts=2, attention_pretrain_plateau=0.5)
    fit(micro_magnet(attention_tissue_only=True), SlideData(records, num_workers=0),
        TrainConfig(device="cpu", amp="off", threads=2, progress=False, baseline_eval=False, save_every=0,
                    tensorboard=False, time_limit=600.0), recipe)
    assert got["restarts"] == 2 and got["plateau"] == 0.5
    assert 0.9 * 590 < got["time_left"] <= 0.9 * 600  # nine tenths of what the run has left: the loop keeps a tenth


def _phase(net, monkeypatch, **kw):
    import magnet_zoo.train.attention_mil as attention_mil

    views = torch.stack([torch.from_numpy(_spotted(s, s % 2 == 0)[0]).permute(2, 0, 1).float()
                         for s in range(8)]).div(127.5).sub(1)
    views = torch.nn.functional.interpolate(views, size=(56, 56), mode="area").unsqueeze(1)
    monkeypatch.setattr(attention_mil, "read_views", lambda model, paths: views[: len(paths)].clone())
    return attention_mil.pretrain_attention(net, [str(i) for i in range(8)], [int(s % 2 == 0) for s in range(8)],
                                            steps=6, lr=1e-2, top=0.1, seed=0, batch=4, **kw)


def test_a_phase_that_leaves_the_plateau_is_not_restarted_and_trains_exactly_as_without_restarts(monkeypatch):
    nets, rng_after = [], []
    for kw in ({}, {"restarts": 2, "plateau": 100.0}):  # every loss is below a plateau of 100: never restarted
        torch.manual_seed(0)
        net = micro_magnet(attention_tissue_only=True)
        done = _phase(net, monkeypatch, **kw)
        nets.append((net, done))
        rng_after.append(torch.rand(3))
    (plain, a), (guarded, b) = nets
    for (k, v), w in zip(plain.state_dict().items(), guarded.state_dict().values(), strict=True):
        assert torch.equal(v, w), k
    assert a["loss_per_50_steps"] == b["loss_per_50_steps"] and "attempts" not in a
    assert len(b["attempts"]) == 1 and b["attempt_kept"] == 0
    torch.testing.assert_close(rng_after[0], rng_after[1])


def test_a_phase_on_its_plateau_starts_again_from_fresh_maps_and_keeps_the_lowest_final_loss(monkeypatch, caplog):
    import logging

    torch.manual_seed(0)
    plain = micro_magnet(attention_tissue_only=True)
    _phase(plain, monkeypatch)
    after_plain = torch.rand(3)
    torch.manual_seed(0)
    net = micro_magnet(attention_tissue_only=True)
    with caplog.at_level(logging.WARNING, logger="magnet_zoo.train.attention_mil"):
        done = _phase(net, monkeypatch, restarts=2, plateau=1e-6)  # every start counts as on the plateau
    torch.testing.assert_close(torch.rand(3), after_plain)  # fresh starts draw from their own seeds
    assert caplog.text.count("starting the phase again") == 2
    finals = [a["loss_last_50"] for a in done["attempts"]]
    assert len(finals) == 3 and len(set(finals)) == 3  # three different starts
    kept = done["attempt_kept"]
    assert finals[kept] == min(finals) and done["loss_last_50"] == pytest.approx(finals[kept])
    assert done["attempts"][0]["loss_first_50"] == pytest.approx(_phase_first(monkeypatch))
    layer = net.layers[0]
    others = [k for k in net.state_dict() if not k.startswith("layers.0.stacks.")]
    assert all(torch.equal(net.state_dict()[k], plain.state_dict()[k]) for k in others)  # only the first map moved
    same_as_first_start = all(torch.equal(v, plain.state_dict()["layers.0.stacks." + k])
                              for k, v in layer.stacks.state_dict().items())
    assert same_as_first_start == (kept == 0)  # the layer holds the kept start's map
    assert all(p.grad is None for p in net.parameters())

    caplog.clear()
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="magnet_zoo.train.attention_mil"):
        late = _phase(micro_magnet(attention_tissue_only=True), monkeypatch, restarts=2, plateau=1e-6, time_left=0.0)
    assert len(late["attempts"]) == 1 and "would not fit" in caplog.text  # no time for another start
    with pytest.raises(ValueError, match="restarts"):
        _phase(micro_magnet(attention_tissue_only=True), monkeypatch, restarts=-1)
    with pytest.raises(ConfigError, match="attention_pretrain_restarts"):
        get_recipe("learn_to_look_mil", attention_pretrain_restarts=-1)
    with pytest.raises(ConfigError, match="attention_pretrain_plateau"):
        get_recipe("learn_to_look_mil", attention_pretrain_plateau=0.0)


def test_a_phase_on_its_plateau_can_train_the_same_map_on_at_the_final_share(monkeypatch):
    import magnet_zoo.train.attention_mil as attention_mil

    seen = []
    real = attention_mil.mil_bce

    def record(logits, mask, labels, *, top, edge_weight=1.0, **kw):
        seen.append((top, edge_weight))
        return real(logits, mask, labels, top=top, edge_weight=edge_weight, **kw)

    monkeypatch.setattr(attention_mil, "mil_bce", record)
    torch.manual_seed(0)
    plain = micro_magnet(attention_tissue_only=True)
    alone = _phase(plain, monkeypatch, top_start=1.0, edges="below", edge_start=0.5)
    after_plain = torch.rand(3)
    first = list(seen)
    seen.clear()
    torch.manual_seed(0)
    net = micro_magnet(attention_tissue_only=True)
    done = _phase(net, monkeypatch, top_start=1.0, edges="below", edge_start=0.5, restarts=1, plateau=1e-6,
                  restart_from="continue")
    torch.testing.assert_close(torch.rand(3), after_plain)  # nothing drawn from the loop's random stream
    assert seen[:6] == first  # the first phase as without restarts: annealed share, the edge from step 3
    assert seen[6:] == [(0.1, 1.0)] * 6  # then the final share and the edge term from the first step
    assert len(done["attempts"]) == 2 and done["restart_from"] == "continue"
    assert done["attempts"][0]["loss_last_50"] == pytest.approx(alone["loss_last_50"])
    kept = done["attempt_kept"]
    assert done["loss_last_50"] == pytest.approx(done["attempts"][kept]["loss_last_50"])
    moved = any(not torch.equal(v, plain.state_dict()["layers.0.stacks." + k])
                for k, v in net.layers[0].stacks.state_dict().items())
    assert moved == (kept == 1)  # the map trained on, unless the first phase's ended lower
    finals = [a["loss_last_50"] for a in done["attempts"]]  # each phase's 6 steps: its mean
    whole = np.mean(finals) if kept == 1 else finals[0]  # the kept map's whole curve: both phases when continued
    assert done["loss_per_50_steps"] == [pytest.approx(whole)]
    with pytest.raises(ValueError, match="restart_from"):
        _phase(micro_magnet(attention_tissue_only=True), monkeypatch, restarts=1, restart_from="again")
    with pytest.raises(ConfigError, match="attention_pretrain_restart_from"):
        get_recipe("learn_to_look_mil", attention_pretrain_restart_from="again")


def _phase_first(monkeypatch) -> float:
    torch.manual_seed(0)
    return _phase(micro_magnet(attention_tissue_only=True), monkeypatch)["loss_first_50"]


def test_the_edge_push_starts_at_its_share_of_the_phase_and_the_edge_is_never_pooled(monkeypatch):
    import magnet_zoo.train.attention_mil as attention_mil

    logits = torch.zeros(1, 1, 4, 4)
    logits[..., 0, :] = 5.0  # the top row: edge (the map's border) only
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    labels = torch.tensor([0.0])
    pushed, pooled = mil_bce(logits, mask, labels, top=0.5, edges="negative")
    unpushed, pooled_off = mil_bce(logits, mask, labels, top=0.5, edges="negative", edge_weight=0.0)
    torch.testing.assert_close(pooled, pooled_off)  # the 2x2 inside pooled either way: 0, not the edge's 5
    assert float(pooled) == 0.0
    assert float(unpushed) == pytest.approx(float(torch.nn.functional.softplus(torch.tensor(0.0))))
    assert float(pushed) > float(unpushed) + 1.0  # the edge's logits of 5 cost only when pushed

    weights = []
    real = attention_mil.mil_bce

    def record(*args, edge_weight=1.0, **kw):
        weights.append(edge_weight)
        return real(*args, edge_weight=edge_weight, **kw)

    monkeypatch.setattr(attention_mil, "mil_bce", record)
    monkeypatch.setattr(attention_mil, "read_views", lambda model, paths: torch.rand(len(paths), 1, 3, 56, 56))
    net = micro_magnet(attention_tissue_only=True)
    done = attention_mil.pretrain_attention(net, ["a", "b", "c", "d"], [1, 0, 1, 0], steps=10, lr=1e-3, top=0.1,
                                            seed=0, batch=4, edges="negative", edge_start=0.4)
    assert weights == [0.0] * 4 + [1.0] * 6 and done["edge_start"] == 0.4
    with pytest.raises(ValueError, match="edge_start"):
        attention_mil.pretrain_attention(net, ["a", "b"], [1, 0], steps=1, lr=1e-3, top=0.1, seed=0, edge_start=1.0)
    with pytest.raises(ConfigError, match="attention_pretrain_edge_start"):
        get_recipe("learn_to_look_mil", attention_pretrain_edge_start=-0.1)


def test_below_edges_only_push_an_edge_that_is_not_a_margin_below_the_pooled_logit():
    from magnet_zoo.train.attention_mil import EDGE_MARGIN

    logits = torch.zeros(2, 1, 4, 4)
    logits[..., 1:3, 1:3] = 2.0  # the inside: pooled 2 on both slides
    logits[0, 0, 0, 0] = 3.0  # slide 0: one edge pixel above the pooled level
    logits[1, 0, 0, 0] = 2.0 - EDGE_MARGIN - 0.5  # slide 1: every edge pixel at least a margin below it
    logits[1, 0, 0, 1:] = -5.0
    logits[1, 0, 1:, :] = torch.where(logits[1, 0, 1:, :] == 0, -5.0, logits[1, 0, 1:, :])
    logits.requires_grad_(True)
    mask = torch.ones(2, 1, 4, 4, dtype=torch.bool)
    labels = torch.tensor([1.0, 0.0])
    below, pooled = mil_bce(logits, mask, labels, top=0.5, edges="below")
    plain, pooled_plain = mil_bce(logits, mask, labels, top=0.5, edges="below", edge_weight=0.0)
    torch.testing.assert_close(pooled, torch.full((2, 1), 2.0))  # the edge is never pooled
    torch.testing.assert_close(pooled, pooled_plain)
    # slide 0's edge: 11 pixels at 0 (below 2 - margin: free) and one at 3 (3 - 2 + 1 = 2), averaged over 12
    assert float((below - plain).detach()) == pytest.approx(2.0 / 12 / 2)  # the mean over two slides
    below.backward()
    grad = logits.grad[:, 0]
    plain_grad = torch.autograd.grad(mil_bce(logits, mask, labels, top=0.5, edges="below", edge_weight=0.0)[0],
                                     logits)[0][:, 0]
    extra = grad - plain_grad
    assert float(extra[0, 0, 0]) > 0 and int((extra != 0).sum()) == 1  # only the edge pixel above is pushed
    torch.testing.assert_close(grad[:, 1:3, 1:3], plain_grad[:, 1:3, 1:3])  # the pooled level is a constant there
    negative, _ = mil_bce(logits, mask, labels, top=0.5, edges="negative")
    assert float(negative.detach()) > float(below.detach())  # towards 0, every edge pixel of both slides costs
    with pytest.raises(ValueError, match="tissue mask"):
        mil_bce(logits, None, labels, top=0.5, edges="below")
    # the default recipe's term; the former one stays a field away
    assert get_recipe("learn_to_look_mil").attention_mil_edges == "below"
    assert get_recipe("learn_to_look_mil", attention_mil_edges="negative").attention_mil_edges == "negative"
