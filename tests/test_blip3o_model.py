"""BLIP3-o model glue: sequences, padding invariance, the three generation variants, the pipeline."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from diffusers import LuminaNextDiT2DModel, SanaTransformer2DModel
from transformers import Qwen3ForCausalLM

from blip3o.config.checks import ConfigError
from blip3o.config.model import DiTConfig, GenerationConfig, ModelConfig
from blip3o.data.processing import generation_inputs, understanding_inputs
from blip3o.data.tokenizer import train_bpe_tokenizer
from blip3o.infer.pipeline import BLIP3oPipeline
from blip3o.models.build import Encoders, build_blip3o, unit_scales
from blip3o.models.heads import (
    CELL_FACTORS,
    CROSS_GATE_INIT,
    LAYOUT_VOCAB,
    FlowHead,
    MaskedHead,
    PixelDecoder,
    RegressionHead,
    cell_inputs,
    cell_log_probs,
    ids_to_layout,
)
from blip3o.models.parts import build_clip, build_vae
from blip3o.models.unified import positions_from_mask
from blip3o.train.tasks import causal_lm_loss, sigmoid_loss
from blip3o.world.spec import COLOR_NAMES, NUM_CLASS_IDS, NUM_COLOUR_IDS, SHAPES

TEXTS = [
    "a photo of a red circle",
    "a photo of two stars",
    "a photo of a blue square left of a green cross",
    "Generate an image: ",
    "What colour is the circle?",
    "red",
    "Describe the image.",
    "yes",
    "no",
] * 4


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(TEXTS, vocab_size=300)


def _pipeline(tokenizer, generation: GenerationConfig) -> BLIP3oPipeline:
    torch.manual_seed(0)
    cfg = ModelConfig(generation=generation)
    clip = build_clip(cfg.vision, len(tokenizer))
    enc = Encoders(clip.vision_model, build_vae(cfg.vae), cfg.vision.pool, unit_scales(cfg))
    model = build_blip3o(cfg, tokenizer, enc.vision)
    c, side, _ = cfg.latent_shape
    decoder = PixelDecoder(cfg.decoder, c, side, cfg.decoder_channels) if generation.target != "latent" else None
    return BLIP3oPipeline(cfg, model, tokenizer, enc, decoder)


def test_parts_are_the_library_classes(tokenizer):
    pipe = _pipeline(tokenizer, GenerationConfig())
    assert isinstance(pipe.model.backbone, Qwen3ForCausalLM)
    assert isinstance(pipe.model.head.dit, LuminaNextDiT2DModel)
    assert isinstance(pipe.decoder.dit, SanaTransformer2DModel)


def test_positions_from_left_padded_mask():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert positions_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


@pytest.mark.parametrize("connector_layers", [0, 2])
def test_condition_does_not_depend_on_padding(tokenizer, connector_layers):
    model = _pipeline(tokenizer, GenerationConfig(connector_layers=connector_layers)).model.eval()
    prompts = ["a photo of a red circle", "a photo of a blue square left of a green cross"]
    ids, mask = generation_inputs(tokenizer, prompts)
    assert mask[0].sum() < mask[1].sum()  # the first row is left-padded
    with torch.no_grad():
        together = model.condition(ids, mask)
        alone = [model.condition(*generation_inputs(tokenizer, [p])) for p in prompts]
    for i in range(2):
        torch.testing.assert_close(together[i], alone[i][0], rtol=1e-4, atol=1e-5)


def test_connector_runs_fresh_backbone_layers_over_the_prompt_and_queries(tokenizer):
    """The connector is the backbone's own decoder class at its width, run over the backbone's last hidden
    states of the whole prompt-and-queries sequence; the condition is its output at the queries. Without layers
    it holds no parameters and the condition is the backbone's query states."""
    plain = _pipeline(tokenizer, GenerationConfig()).model.eval()
    model = _pipeline(tokenizer, GenerationConfig(connector_layers=2)).model.eval()
    assert not list(plain.connector.parameters())
    decoder = model.connector.model
    assert type(decoder) is type(model.backbone.model) and decoder.config.num_hidden_layers == 2
    assert decoder.config.hidden_size == model.backbone.config.hidden_size
    ids, mask = generation_inputs(tokenizer, ["a photo of a red circle", "a photo of two blue squares"])
    full = torch.cat([mask, mask.new_ones(2, model.num_queries)], 1)
    positions = positions_from_mask(full)
    with torch.no_grad():
        embeds = torch.cat([model.embed(ids), model.queries.expand(2, -1, -1)], 1)
        states = model.backbone.model(
            inputs_embeds=embeds, attention_mask=full, position_ids=positions
        ).last_hidden_state
        h = states
        rotary = decoder.rotary_emb(h, positions)
        causal = torch.ones(h.shape[1], h.shape[1], dtype=torch.bool).tril()
        allowed = (causal[None] & full.bool()[:, None, :])[:, None]  # (B, 1, T, T): past, non-padding keys
        for layer in decoder.layers:  # the layers by hand, with an explicit boolean mask
            h = layer(h, attention_mask=allowed, position_ids=positions, position_embeddings=rotary)
            h = h[0] if isinstance(h, tuple) else h
        want = decoder.norm(h)[:, -model.num_queries :]
        torch.testing.assert_close(
            model.condition(ids, mask)[mask.sum(1) == mask.shape[1]],
            want[mask.sum(1) == mask.shape[1]],
            rtol=1e-4,
            atol=1e-5,
        )
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("connector.")})
        torch.testing.assert_close(plain.condition(ids, mask), states[:, -model.num_queries :])
        # fresh layers add small residual updates: the connector starts near the plain condition, not at it
        gap = (model.condition(ids, mask) - plain.condition(ids, mask)).abs().max()
        assert 0 < gap < 0.2 * plain.condition(ids, mask).abs().max()


def test_image_placeholders_take_the_projected_features(tokenizer):
    model = _pipeline(tokenizer, GenerationConfig()).model.eval()
    n = model.vision.config.image_size // model.vision.config.patch_size
    batch = understanding_inputs(tokenizer, ["What colour is the circle?"], ["red"], n * n)
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        embeds = model.embed(batch["input_ids"], pixels)
        feats = model.image_features(pixels)
    slots = batch["input_ids"][0] == model.image_token_id
    assert int(slots.sum()) == n * n
    torch.testing.assert_close(embeds[0, slots], feats[0])
    text = model.backbone.get_input_embeddings()(batch["input_ids"])[0, ~slots]
    torch.testing.assert_close(embeds[0, ~slots], text)
    # labels cover exactly the answer and <|im_end|>
    labelled = batch["labels"][0][batch["labels"][0] >= 0].tolist()
    assert tokenizer.decode(labelled) == "red<|im_end|>"


def test_image_positions_add_a_trained_place_embedding_to_every_image_token(tokenizer):
    """With ``image_positions`` the projector's tokens are the plain ones plus ViT's 2-D sin-cos table at
    first (one distinct row per patch), and the table trains."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    torch.manual_seed(0)
    cfg = ModelConfig()
    vision = build_clip(cfg.vision, len(tokenizer)).vision_model
    plain = build_blip3o(cfg, tokenizer, vision)
    placed = build_blip3o(replace(cfg, backbone=replace(cfg.backbone, image_positions=True)), tokenizer, vision)
    assert plain.projector.positions is None
    placed.projector.net.load_state_dict(plain.projector.net.state_dict())
    pixels = torch.zeros(1, 3, 64, 64)
    flat = plain.image_features(pixels)[0]
    table = get_2d_sincos_pos_embed(cfg.backbone.hidden_size, cfg.vision.grid, output_type="pt").float()
    assert torch.cdist(table, table).add(torch.eye(len(table))).min() > 0.5
    torch.testing.assert_close(placed.image_features(pixels)[0], flat + table)
    batch = understanding_inputs(tokenizer, ["What colour is the circle?"], ["red"], cfg.vision.grid**2)
    logits = placed.logits(batch["input_ids"], batch["attention_mask"], pixels)
    causal_lm_loss(logits, batch["labels"]).backward()
    grad = placed.projector.positions.grad
    assert grad is not None and bool((grad.abs().sum(1) > 0).all())  # every patch's place is trained


def test_multi_turn_rows_train_every_answer_once(tokenizer):
    """A conversation about one image: the image opens the first turn only, and the labels are exactly
    the answers, each with its <|im_end|>."""
    n = 4
    batch = understanding_inputs(
        tokenizer, [["Is the circle red?", "How many stars are there?"]], [["red circle yes", "stars two"]], n
    )
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert int((batch["input_ids"][0] == image_id).sum()) == n
    labelled = batch["labels"][0][batch["labels"][0] >= 0].tolist()
    assert tokenizer.decode(labelled) == "red circle yes<|im_end|>stars two<|im_end|>"
    with pytest.raises(ValueError, match="2 questions but 1 answers"):
        understanding_inputs(tokenizer, [["Is the circle red?", "Why?"]], [["red circle yes"]], n)


def test_understanding_rows_never_pair_a_question_with_the_answer_that_leaks_it(tokenizer):
    """With several turns per row a conversation asks the scene's questions in random order, every one
    of them also as the opening turn, but never both the yes/no and the colour question about the
    scene's one object; with one turn, one question a row."""
    from types import SimpleNamespace

    from blip3o.train.tasks import understanding_batch

    qa = [
        {"type": "color", "question": "What colour is the circle?", "answer": "circle red"},
        {"type": "yesno", "question": "Is the circle blue?", "answer": "circle red blue no"},
        {"type": "existence", "question": "Is there a star in the image?", "answer": "star no"},
    ]
    n = 200
    data = SimpleNamespace(
        meta=[{"qa": qa, "caption": "a red circle"}] * n, images=torch.zeros(n, 3, 64, 64, dtype=torch.uint8)
    )
    batch = understanding_batch(data, tokenizer, list(range(n)), "s", 4, qa_turns=3)
    texts = [tokenizer.decode(row[row >= 0].tolist()) for row in batch["labels"]]
    conversations = [t.split("<|im_end|>")[:-1] for t in texts if t != "a red circle<|im_end|>"]
    assert 0.65 < len(conversations) / n < 0.85  # a quarter of the rows are captions
    for answers in conversations:
        assert len(answers) == 2 and "star no" in answers
        assert ("circle red" in answers) != ("circle red blue no" in answers)
    assert {answers[0] for answers in conversations} == {"star no", "circle red", "circle red blue no"}
    one = understanding_batch(data, tokenizer, list(range(n)), "s", 4, qa_turns=1)
    assert all(tokenizer.decode(r[r >= 0].tolist()).count("<|im_end|>") == 1 for r in one["labels"])


def test_lm_loss_matches_transformers(tokenizer):
    model = _pipeline(tokenizer, GenerationConfig()).model.eval()
    batch = understanding_inputs(
        tokenizer, ["Describe the image.", "What colour is the circle?"], ["a photo of two stars", "red"], 4
    )
    batch["input_ids"][batch["input_ids"] == model.image_token_id] = 5  # text-only: compare with HF's own loss
    with torch.no_grad():
        ours = causal_lm_loss(model.logits(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        ref = model.backbone(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        ).loss
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("target", "objective", "head"),
    [("clip", "flow", FlowHead), ("clip", "mse", RegressionHead), ("latent", "flow", FlowHead)],
)
def test_three_variants_generate_images(tokenizer, target, objective, head):
    pipe = _pipeline(tokenizer, GenerationConfig(target=target, objective=objective))
    assert isinstance(pipe.model.head, head)
    images = pipe("a photo of two stars", num_images=2, seed=3, num_inference_steps=2, decoder_steps=2)
    assert len(images) == 2 and images[0].size == (64, 64)
    if objective == "flow":  # different seeds → different images
        assert images[0].tobytes() != images[1].tobytes()


SELF_CONDITIONED = GenerationConfig(self_condition=True, prediction="sample")
DISCRETE = GenerationConfig(target="layout", objective="discrete")


@pytest.mark.parametrize(
    "generation", [GenerationConfig(), SELF_CONDITIONED, DISCRETE], ids=["plain", "self", "discrete"]
)
def test_batch_of_prompts_equals_prompts_one_at_a_time(tokenizer, generation):
    pipe = _pipeline(tokenizer, generation)
    prompts = ["a photo of a red circle", "a photo of a blue square left of a green cross"]
    together = pipe(prompts, seed=[11, 42], num_inference_steps=3, decoder_steps=3)
    alone = [pipe(p, seed=s, num_inference_steps=3, decoder_steps=3)[0] for p, s in zip(prompts, [11, 42], strict=True)]
    for a, b in zip(together, alone, strict=True):
        diff = torch.tensor(list(a.tobytes())).int() - torch.tensor(list(b.tobytes())).int()
        assert diff.abs().max() <= 1


def test_chat_returns_text(tokenizer):
    pipe = _pipeline(tokenizer, GenerationConfig())
    from PIL import Image

    answer = pipe.chat(Image.new("RGB", (64, 64), (255, 0, 0)), "What colour is the circle?", max_new_tokens=4)
    assert isinstance(answer, str)
    answers = pipe.chat(
        [Image.new("RGB", (64, 64))] * 2, ["What colour is the circle?", "Describe the image."], max_new_tokens=4
    )
    assert len(answers) == 2


def test_mini_clip_starts_from_siglips_initialisation():
    import math

    from blip3o.config.model import VisionConfig

    clip = build_clip(VisionConfig(), 300)
    assert clip.logit_scale.item() == pytest.approx(math.log(10.0))
    assert clip.logit_bias.item() == pytest.approx(-10.0)


def test_spatial_decoder_concatenates_the_upsampled_map(tokenizer):
    cfg = ModelConfig()
    c, side, _ = cfg.latent_shape
    d, g = cfg.vision.hidden_size, cfg.vision.target_grid
    torch.manual_seed(0)
    dec = PixelDecoder(cfg.decoder, c, side, d).eval()
    assert dec.dit.config.in_channels == c + d and dec.dit.config.out_channels == c
    x, sigma = torch.randn(2, c, side, side), torch.tensor([0.3, 0.8])
    grid = torch.randn(2, d, g, g)
    tokens = grid.flatten(2).transpose(1, 2)
    up = grid.repeat_interleave(side // g, 2).repeat_interleave(side // g, 3)
    expected = dec.dit(torch.cat([x, up], 1), tokens, 1000.0 * sigma).sample
    torch.testing.assert_close(dec(x, sigma, tokens), expected)
    plain = PixelDecoder(replace(cfg.decoder, spatial=False), c, side, d)
    assert plain.dit.config.in_channels == c


def test_sigmoid_loss_is_siglips_plus_the_hard_negative_column(tokenizer):
    from blip3o.config.model import VisionConfig

    torch.manual_seed(0)
    clip = build_clip(VisionConfig(), len(tokenizer))
    pixels = torch.randn(3, 3, 64, 64)
    texts = tokenizer(TEXTS[:6], padding="max_length", truncation=True, max_length=16, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        reference = clip(input_ids=texts[:3], pixel_values=pixels, return_loss=True).loss
        logits = clip(input_ids=texts, pixel_values=pixels).logits_per_image  # (3, 6)
    torch.testing.assert_close(sigmoid_loss(logits[:, :3]), reference)
    extra = -torch.nn.functional.logsigmoid(-logits[:, 3:]).sum() / 3
    torch.testing.assert_close(sigmoid_loss(logits), reference + extra)


def test_locality_loss_is_the_share_of_map_variance_in_empty_patches():
    """The empty patches are those no object box overlaps (a box edge inside a patch counts); the loss is
    Σ over them of ‖feature − background‖² over the map's total variance, by hand, and it does not change
    when every feature is scaled or shifted with the background."""
    from blip3o.train.tasks import empty_patches, locality_loss

    star = {"class": "star", "color": "red", "box": [0.0, 0.0, 18.0, 18.0]}  # overlaps columns and rows 0-2
    scene = {"kind": "scene", "size": 64, "objects": [star]}
    empty = empty_patches([scene, {"kind": "text", "size": 64}], 8)
    expected = torch.ones(8, 8, dtype=torch.bool)
    expected[:3, :3] = False
    assert torch.equal(empty[0], expected.flatten()) and not empty[1].any()

    torch.manual_seed(0)
    feats, background = torch.randn(2, 64, 5), torch.randn(5)
    by_hand = (
        sum(((feats[b, n] - background) ** 2).sum() for b in range(2) for n in range(64) if empty[b, n])
        / ((feats - feats.reshape(-1, 5).mean(0)) ** 2).sum()
    )
    loss = locality_loss(feats - background, empty)
    torch.testing.assert_close(loss, by_hand)
    torch.testing.assert_close(locality_loss(3 * (feats + 1) - 3 * (background + 1), empty), loss)
    assert locality_loss(feats - background, torch.zeros_like(empty)) == 0


def test_shift_pixels_moves_each_image_by_its_own_offset_with_replicated_edges():
    """Every output image is the edge-replicated image cropped at some (dy, dx) within the allowed shift,
    found by hand; different images get different offsets; a shift of 0 is the identity."""

    from blip3o.train.tasks import shift_pixels

    torch.manual_seed(0)
    pixels = torch.randn(6, 3, 8, 8)
    moved = shift_pixels(pixels, 2, torch.Generator().manual_seed(0))
    padded = F.pad(pixels, (2, 2, 2, 2), mode="replicate")
    offsets = []
    for b in range(6):
        crops = {(dy, dx): padded[b, :, dy : dy + 8, dx : dx + 8] for dy in range(5) for dx in range(5)}
        found = [offset for offset, crop in crops.items() if torch.equal(moved[b], crop)]
        assert len(found) == 1
        offsets.append(found[0])
    assert len(set(offsets)) > 1
    assert torch.equal(shift_pixels(pixels, 0, torch.Generator().manual_seed(0)), pixels)


def test_shift_loss_is_the_share_of_map_variance_a_move_changes():
    """Σ ‖patch − moved patch‖² over the map's total variance, by hand; 0 for an unmoved map; unchanged when
    both maps are scaled or offset by one vector."""
    from blip3o.train.tasks import shift_loss

    torch.manual_seed(0)
    feats, moved = torch.randn(2, 9, 5), torch.randn(2, 9, 5)
    by_hand = ((feats - moved) ** 2).sum() / ((feats - feats.reshape(-1, 5).mean(0)) ** 2).sum()
    torch.testing.assert_close(shift_loss(feats, moved), by_hand)
    assert shift_loss(feats, feats) == 0
    shift = torch.randn(5)
    torch.testing.assert_close(shift_loss(3 * feats + shift, 3 * moved + shift), by_hand)


def test_grounding_head_reads_every_patch_and_its_targets_are_the_boxes_covering_each_patch(tokenizer):
    """The grounding logits of patch i are the linear head on patch i's feature; the targets give each patch
    the class and colour of the box covering its centre (0 = background), and ignore text scenes."""
    from blip3o.config.model import VisionConfig
    from blip3o.train.tasks import TaggedSiglip, grounding_targets
    from blip3o.world.spec import COLOR_NAMES, SHAPES

    torch.manual_seed(0)
    model = TaggedSiglip(build_clip(VisionConfig(image_size=48), len(tokenizer)), 6, 18).eval()
    pixels = torch.randn(2, 3, 48, 48)
    ids = tokenizer(TEXTS[:2], padding="max_length", max_length=16, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        _, _, logits, offsets, moved = model(ids, pixels)
        patches = model.clip.vision_model(pixel_values=pixels).last_hidden_state  # (2, 36, D): a 6×6 grid
        other = pixels.flip(-1)
        *_, moved_other = model(ids, pixels, other)
        expected_other = model.clip.vision_model(pixel_values=other).last_hidden_state - model.background
    assert moved is None
    torch.testing.assert_close(logits, model.patches(patches))
    torch.testing.assert_close(offsets, patches - model.background)
    torch.testing.assert_close(moved_other, expected_other)

    star = {"class": "star", "color": "red", "box": [0.0, 0.0, 18.0, 18.0]}  # patch centres 4 and 12 px
    circle = {"class": "circle", "color": "blue", "box": [34.0, 40.0, 50.0, 60.0]}  # columns 4-5, rows 5-7
    scene = {"kind": "scene", "size": 64, "objects": [star, circle]}
    classes, colours = grounding_targets([scene, {"kind": "text", "size": 64}], 8)
    expected_class, expected_colour = torch.zeros(8, 8, dtype=torch.long), torch.zeros(8, 8, dtype=torch.long)
    expected_class[:2, :2], expected_colour[:2, :2] = 1 + SHAPES.index("star"), 1 + COLOR_NAMES.index("red")
    expected_class[5:8, 4:6], expected_colour[5:8, 4:6] = 1 + SHAPES.index("circle"), 1 + COLOR_NAMES.index("blue")
    assert torch.equal(classes[0], expected_class.flatten())
    assert torch.equal(colours[0], expected_colour.flatten())
    assert (classes[1] == -100).all() and (colours[1] == -100).all()


def test_grounding_cells_are_the_fine_grids_boxes_in_the_order_a_per_patch_head_emits_them():
    """With 2×2 cells per patch the clip stage's targets are the 16×16 grid's box labels, patch by patch;
    one-hot logits in that order, read back by ``cells_to_map``, give the fine grid again."""

    from blip3o.models.heads import cells_to_map
    from blip3o.train.tasks import grounding_targets, patch_cells

    star = {"class": "star", "color": "red", "box": [0.0, 0.0, 9.0, 13.0]}  # cell centres 2, 6 (x) and 2, 6, 10 (y)
    scene = {"kind": "scene", "size": 64, "objects": [star]}
    fine, _ = grounding_targets([scene], 16)  # (1, 256)
    ordered = patch_cells(fine, 2)  # (1, 256): patch 0's four cells, then patch 1's, …
    assert ordered[0, :4].tolist() == [4, 4, 4, 4]  # patch (0, 0): cells at 2 and 6 px, all on the star
    assert ordered[0, 4:8].tolist() == [0, 0, 0, 0]  # patch (0, 1): cells at 10 and 14 px (x), off it
    assert ordered[0, 32:36].tolist() == [4, 4, 0, 0]  # patch (1, 0): the cell row at 10 px, then 14 px
    logits = F.one_hot(ordered, 7).float().view(1, 64, 4 * 7)  # a per-patch head's outputs, cell-major
    assert torch.equal(cells_to_map(logits, 2).argmax(1).flatten(1), fine)
    assert torch.equal(patch_cells(fine, 1), fine)


def test_a_layout_head_with_cells_keeps_the_maps_token_grid():
    """A 16×16 layout of 2×2 cells per map patch is generated by a DiT with patch size 2: 64 tokens, the
    same as the 8×8 CLIP map, and the velocity has the layout's shape."""
    from blip3o.config.model import VisionConfig

    cfg = ModelConfig(vision=VisionConfig(pool=1, grounding_cells=2), generation=GenerationConfig(target="layout"))
    assert cfg.target_shape == (18, 16, 16) and cfg.target_patch == 2
    assert ModelConfig(generation=GenerationConfig(target="clip")).target_patch == 1
    head = FlowHead(cfg.generation.dit, 18, 16, 32, patch=cfg.target_patch)
    assert head.dit.patch_embedder.patch_size == 2
    tokens = []
    hook = head.dit.layers[0].register_forward_hook(lambda m, args, out: tokens.append(args[0].shape[1]))
    v = head(torch.randn(2, 18, 16, 16), torch.rand(2), torch.randn(2, 5, 32))
    hook.remove()
    assert v.shape == (2, 18, 16, 16) and tokens == [64]


def test_clean_estimate_inverts_the_straight_path():
    """x − σ·v is x0 for the straight path's velocity v = ε − x0; with x-prediction the estimate is the
    DiT's x̂0 itself (σ above the floor)."""

    torch.manual_seed(0)
    x0, eps, sigma = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.tensor([0.9, 0.5, 0.2])
    x = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * eps
    head = FlowHead(DiTConfig(hidden_size=32, num_layers=1, num_heads=2), 4, 2, 8, self_condition=True)
    torch.testing.assert_close(head.clean_estimate(x, sigma, eps - x0), x0)
    sample = FlowHead(DiTConfig(hidden_size=32, num_layers=1, num_heads=2), 4, 2, 8, prediction="sample")
    y = torch.randn_like(x)
    torch.testing.assert_close(sample.clean_estimate(x, sigma, (x - y) / sigma.view(-1, 1, 1, 1)), y)


def test_self_conditioned_sampling_feeds_each_step_the_previous_steps_estimate():
    """``SelfConditioned`` inside ``euler_sample`` is the Euler loop written out with x̂0 of step k − 1 as the
    DiT's extra input at step k (zeros at the first), and the estimate changes the sample."""
    from blip3o.diffusion.sampler import euler_sample, sigma_schedule
    from blip3o.models.heads import SelfConditioned

    torch.manual_seed(0)
    head = FlowHead(DiTConfig(hidden_size=32, num_layers=1, num_heads=2), 4, 4, 8, self_condition=True).eval()
    noise, cond = torch.randn(2, 4, 4, 4), torch.randn(2, 3, 8)
    with torch.no_grad():
        got = euler_sample(SelfConditioned(head, head), noise, cond, num_steps=4)
        x, estimate, sigmas = noise.clone(), None, sigma_schedule(4)
        for s, s_next in itertools.pairwise(sigmas):
            sigma = s.expand(2)
            v = head(x, sigma, cond, estimate=estimate)
            estimate = x - s * v
            x = x + (s_next - s) * v
        plain = euler_sample(head, noise, cond, num_steps=4)
    torch.testing.assert_close(got, x)
    assert not torch.allclose(got, plain, atol=1e-4)


def test_self_conditioned_training_gives_marked_rows_the_heads_own_estimate(tokenizer):
    """In training, rows marked in ``self_cond`` get the head's no-grad x̂0 for the same x_σ as input, the
    others zeros, and only the second pass carries gradient."""
    pipe = _pipeline(tokenizer, GenerationConfig(self_condition=True))
    model, head = pipe.model.eval(), pipe.model.head
    ids, mask = generation_inputs(tokenizer, ["a photo of a red circle", "a photo of two stars"])
    x, sigma = torch.randn(2, *pipe.cfg.target_shape), torch.tensor([0.8, 0.3])
    inputs = dict(input_ids=ids, attention_mask=mask, x=x, sigma=sigma, keep=torch.ones(2))
    v = model("generate", **inputs, self_cond=torch.tensor([True, False]))
    with torch.no_grad():
        cond = model.condition(ids, mask)
        estimate = head.clean_estimate(x, sigma, head(x, sigma, cond))
        first = head(x[:1], sigma[:1], cond[:1], estimate=estimate[:1])
        second = head(x[1:], sigma[1:], cond[1:])
    torch.testing.assert_close(v[:1], first, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(v[1:], second, rtol=1e-4, atol=1e-5)
    assert v.requires_grad and not torch.allclose(v[:1], head(x[:1], sigma[:1], cond[:1]).detach(), atol=1e-4)


def test_flow_head_starts_with_its_cross_attention_open():
    """diffusers starts Lumina-Next's cross-attention gates at 0, so an untrained DiT sees its condition only
    through the pooled caption embedding. The head opens them: tokens with the same mean but different
    content give a different velocity at initialisation, as they do not with the library's zero gates."""

    torch.manual_seed(0)
    head = FlowHead(DiTConfig(), channels=8, side=4, cond_dim=32).eval()
    x, sigma = torch.randn(2, 8, 4, 4), torch.tensor([0.3, 0.8])
    hidden = head.dit.time_caption_embed.caption_embedder[1].in_features
    cond = torch.randn(2, 5, hidden)
    delta = torch.randn(2, 5, hidden)
    other = cond + delta - delta.mean(1, keepdim=True)  # same mean over tokens
    rope = torch.view_as_complex(head.rope.float().contiguous())
    mask = torch.ones(2, 5, dtype=torch.bool)
    velocity = lambda c: head.dit(x, 1000 * sigma, c, mask, rope, cross_attention_kwargs={}).sample  # noqa: E731
    assert all(torch.allclose(layer.gate, torch.tensor(CROSS_GATE_INIT)) for layer in head.dit.layers)
    assert (velocity(cond) - velocity(other)).abs().mean() > 0.05 * velocity(cond).abs().mean()
    with torch.no_grad():
        for layer in head.dit.layers:
            layer.gate.zero_()
    torch.testing.assert_close(velocity(cond), velocity(other))


def test_flow_head_feeds_lumina_the_scheduler_timestep():
    """The head gives Lumina-Next t = 1000·σ (the official BLIP3-o convention): the library call with that
    timestep gives the same velocity, and the time embedding tells noise levels apart, which t = 1 − σ
    ∈ [0, 1] hardly does (σ = 0.5 and 0.45 differ by 1 % of the embedding's norm)."""

    torch.manual_seed(0)
    head = FlowHead(DiTConfig(), channels=8, side=4, cond_dim=32).eval()
    x, cond, sigma = torch.randn(2, 8, 4, 4), torch.randn(2, 5, 32), torch.tensor([0.2, 0.9])
    rope = torch.view_as_complex(head.rope.float().contiguous())
    mask = torch.ones(2, 5, dtype=torch.bool)
    direct = head.dit(x, 1000 * sigma, head.cond_proj(cond), mask, rope, cross_attention_kwargs={}).sample
    torch.testing.assert_close(head(x, sigma, cond), direct)

    proj = head.dit.time_caption_embed.time_proj
    spread = lambda t: (proj(t[:1]) - proj(t[1:])).norm() / proj(t[:1]).norm()  # noqa: E731
    assert spread(1000 * torch.tensor([0.5, 0.45])) > 0.5 > 10 * spread(torch.tensor([0.5, 0.55]))


def test_sample_predicting_head_returns_the_velocity_of_its_clean_map():
    """With ``prediction="sample"`` the DiT's output is x̂0 and the head returns (x_σ − x̂0)/max(σ, floor):
    checked against the library call, and a DiT that outputs the true x0 gives the true velocity ε − x0."""
    from blip3o.diffusion.flow import interpolate, velocity_target
    from blip3o.models.heads import SAMPLE_SIGMA_FLOOR

    torch.manual_seed(0)
    head = FlowHead(DiTConfig(), channels=8, side=4, cond_dim=32, prediction="sample").eval()
    x, cond, sigma = torch.randn(3, 8, 4, 4), torch.randn(3, 5, 32), torch.tensor([0.01, 0.3, 1.0])
    rope = torch.view_as_complex(head.rope.float().contiguous())
    mask = torch.ones(3, 5, dtype=torch.bool)
    x0_hat = head.dit(x, 1000 * sigma, head.cond_proj(cond), mask, rope, cross_attention_kwargs={}).sample
    floor = torch.tensor([SAMPLE_SIGMA_FLOOR, 0.3, 1.0]).view(3, 1, 1, 1)
    torch.testing.assert_close(head(x, sigma, cond), (x - x0_hat) / floor)

    x0, noise, sigma = torch.randn(3, 8, 4, 4), torch.randn(3, 8, 4, 4), torch.tensor([0.05, 0.4, 0.9])
    x_t = interpolate(x0, noise, sigma)
    head.dit.forward = lambda *args, **kwargs: type("Out", (), {"sample": x0})()  # an oracle DiT
    torch.testing.assert_close(head(x_t, sigma, cond), velocity_target(x0, noise))
    with pytest.raises(ValueError, match="prediction must be"):
        FlowHead(DiTConfig(), channels=8, side=4, cond_dim=32, prediction="epsilon")


def test_condition_norm_standardises_the_query_states_over_the_data(tokenizer):
    """In training the condition is standardised per (query, channel) over the batch and the running
    statistics follow; at inference those statistics apply, so a prompt's condition does not depend on
    the batch it is in. Off (the default), the condition is the raw query states."""
    prompts = ["a photo of a red circle", "a photo of two stars", "a photo of a blue square left of a green cross"]
    ids, mask = generation_inputs(tokenizer, prompts * 3)
    raw = _pipeline(tokenizer, GenerationConfig()).model
    normed = _pipeline(tokenizer, GenerationConfig(condition_norm=True)).model
    with torch.no_grad():
        states = raw.condition(ids, mask)  # the same seed builds the same weights
        trained = normed.train().condition(ids, mask)
        flat = states.flatten(1)
        expected = (flat - flat.mean(0)) / (flat.var(0, unbiased=False) + 1e-5).sqrt()
        torch.testing.assert_close(trained.flatten(1), expected, rtol=1e-4, atol=1e-4)
        norm = normed.condition_norm
        torch.testing.assert_close(norm.running_mean, 0.1 * flat.mean(0))
        normed.eval()
        together = normed.condition(ids, mask)
        alone = normed.condition(*generation_inputs(tokenizer, prompts[:1]))
        torch.testing.assert_close(together[0], alone[0], rtol=1e-4, atol=1e-5)
        scale = (norm.running_var + norm.eps).sqrt()
        torch.testing.assert_close(together.flatten(1), (flat - norm.running_mean) / scale, rtol=1e-4, atol=1e-4)
    assert "condition_norm.running_mean" not in raw.state_dict()


def test_prior_head_feeds_its_regressed_map_to_the_dit_and_builds_on_it():
    """With a prior the DiT reads [x_σ, μ(cond)] and, with x-prediction, x̂0 = μ + its output: checked against
    the library call for both predictions, and a given prior map is used instead of recomputing it."""
    from blip3o.models.heads import SAMPLE_SIGMA_FLOOR

    torch.manual_seed(0)
    x, cond, sigma = torch.randn(3, 8, 4, 4), torch.randn(3, 16, 32), torch.tensor([0.01, 0.3, 1.0])
    mask = torch.ones(3, 16, dtype=torch.bool)
    floor = torch.tensor([SAMPLE_SIGMA_FLOOR, 0.3, 1.0]).view(3, 1, 1, 1)
    for prediction in ("velocity", "sample"):
        head = FlowHead(DiTConfig(), channels=8, side=4, cond_dim=32, prediction=prediction, prior_tokens=16).eval()
        rope = torch.view_as_complex(head.rope.float().contiguous())
        with torch.no_grad():
            prior = head.prior(cond)
            out = head.dit(
                torch.cat([x, prior], 1), 1000 * sigma, head.cond_proj(cond), mask, rope, cross_attention_kwargs={}
            )
            out = out.sample[:, :8]
            expected = out if prediction == "velocity" else (x - (prior + out)) / floor
            torch.testing.assert_close(head(x, sigma, cond), expected)
            other = torch.randn_like(prior)
            assert not torch.allclose(head(x, sigma, cond, prior=other), expected)
            torch.testing.assert_close(head(x, sigma, cond, prior=prior), expected)


def test_the_mse_head_takes_no_prior_and_needs_one_query_per_target_token():
    from blip3o.config import resolve
    from blip3o.config.checks import ConfigError

    assert resolve(
        "tiny-debug", ["model.generation.prior=true", "model.generation.num_queries=8"]
    ).model.generation.prior
    with pytest.raises(ConfigError, match="MSE head is one already"):
        resolve("tiny-debug", ["model.generation.prior=true", "model.generation.objective=mse"])
    with pytest.raises(ConfigError, match="num_queries must be 16"):
        resolve("tiny-debug", ["model.generation.objective=mse", "model.generation.num_queries=8"])


def test_conditional_mean_reads_the_standardised_pooled_condition():
    """Training standardises each (token, channel) over the batch, so a shared offset and scale of the
    condition change nothing; at inference the running statistics apply, one prompt at a time."""
    from blip3o.models.heads import ConditionalMean

    torch.manual_seed(0)
    prior = ConditionalMean(cond_dim=8, num_tokens=3, channels=2, side=4, hidden=16)
    cond = torch.randn(6, 3, 8)
    flat = cond.flatten(1)
    z = ((flat - flat.mean(0)) / (flat.var(0, unbiased=False) + prior.norm.eps).sqrt()).view(6, 3, 8).mean(1)
    torch.testing.assert_close(prior(cond), prior.net(z).view(6, 2, 4, 4))
    torch.testing.assert_close(prior(5 + 3 * cond), prior(cond), rtol=1e-4, atol=1e-4)
    prior.eval()
    torch.testing.assert_close(prior(cond)[:1], prior(cond[:1]))


def test_kept_row_norm_is_batch_norm_over_the_kept_rows_and_keeps_dropped_rows_at_zero():
    """On the kept rows it standardises and tracks running statistics exactly as ``BatchNorm1d`` does on those
    rows alone; dropped (all-zero) rows come out zero, in training and at inference."""
    from blip3o.models.heads import KeptRowNorm

    torch.manual_seed(0)
    x = 3 + 2 * torch.randn(8, 5)
    x[[2, 5]] = 0
    kept = torch.tensor([0, 1, 3, 4, 6, 7])
    ours, ref = KeptRowNorm(5), torch.nn.BatchNorm1d(5, affine=False)
    out = ours(x)
    torch.testing.assert_close(out[kept], ref(x[kept]))
    assert torch.all(out[[2, 5]] == 0)
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    ours(torch.zeros(3, 5))  # a batch of dropped rows leaves the statistics alone
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x)[kept], ref(x[kept]))
    assert torch.all(ours(x)[[2, 5]] == 0)


def test_snap_layout_takes_each_patchs_best_class_and_an_objects_best_colour():
    """One +1 per group (classes, then colours) and −1 elsewhere; a background patch gets the background
    colour whatever its colour scores say, and an object patch its best object colour even where the
    background colour scores higher."""
    from blip3o.models.heads import snap_layout

    classes, colours = 3, 4
    scores = torch.zeros(1, classes + colours, 1, 3)
    scores[0, 1, 0, 0], scores[0, classes + 2, 0, 0] = 5.0, 1.0  # object 1 in colour 2
    scores[0, 0, 0, 1], scores[0, classes + 3, 0, 1] = 5.0, 9.0  # background, whatever the colour says
    scores[0, 2, 0, 2], scores[0, classes, 0, 2], scores[0, classes + 1, 0, 2] = 5.0, 9.0, 0.5  # object 2, colour 1
    expected = -torch.ones_like(scores)
    for patch, (kind, colour) in enumerate([(1, 2), (0, 0), (2, 1)]):
        expected[0, kind, 0, patch] = expected[0, classes + colour, 0, patch] = 1.0
    assert torch.equal(snap_layout(scores, classes), expected)
    assert torch.equal(snap_layout(expected, classes), expected)  # a layout snaps to itself


def test_layout_encoder_with_cells_reads_each_patch_as_a_block_of_cells(tokenizer):
    """With ``vision.grounding_cells=2`` the head's 4 × 18 outputs on patch (r, c) are the layout's cells
    (2r + i, 2c + j), cell (i, j) at i·2 + j; the clip weights must carry a head of that width."""
    from blip3o.config.model import VisionConfig
    from blip3o.models.build import grounding_width
    from blip3o.models.heads import snap_layout, tokens_to_map

    torch.manual_seed(0)
    cfg = ModelConfig(vision=VisionConfig(pool=1, grounding_cells=2), generation=GenerationConfig(target="layout"))
    clip = build_clip(cfg.vision, len(tokenizer))
    head = torch.nn.Linear(cfg.vision.hidden_size, grounding_width(2))
    enc = Encoders(clip.vision_model, build_vae(cfg.vae), 1, unit_scales(cfg), grounding=head)
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    layout = enc.layout(pixels)
    assert layout.shape == (2, *cfg.target_shape)
    with torch.no_grad():
        raw = tokens_to_map(clip.vision_model(pixel_values=pixels).last_hidden_state)  # (2, D, 8, 8)
        for r, c, i, j in [(0, 0, 0, 0), (3, 5, 1, 0), (7, 2, 1, 1), (4, 4, 0, 1)]:
            cell = head(raw[:, :, r, c]).view(2, 4, 18)[:, 2 * i + j]  # (2, 18)
            expected = snap_layout(cell[:, :, None, None], 7)[:, :, 0, 0]
            assert torch.equal(layout[:, :, 2 * r + i, 2 * c + j], expected)


def test_clip_weights_with_a_grounding_head_of_another_width_are_refused(tmp_path, tokenizer):
    from safetensors.torch import save_file

    from blip3o.config.model import VisionConfig
    from blip3o.models.build import GROUNDING_PREFIX

    cfg = ModelConfig(vision=VisionConfig(pool=1, grounding_cells=2), generation=GenerationConfig(target="layout"))
    clip = build_clip(cfg.vision, len(tokenizer))
    state = {f"clip.{k}": v for k, v in clip.state_dict().items()}
    state[GROUNDING_PREFIX + "weight"], state[GROUNDING_PREFIX + "bias"] = torch.zeros(18, 64), torch.zeros(18)
    save_file(state, tmp_path / "clip.safetensors")
    save_file({f"vae.{k}": v for k, v in build_vae(cfg.vae).state_dict().items()}, tmp_path / "vae.safetensors")
    weights = tmp_path / "clip.safetensors", tmp_path / "vae.safetensors"
    with pytest.raises(ValueError, match=r"grounding head has 18 outputs, and vision\.grounding_cells=2 needs 72"):
        Encoders.from_weights(cfg, len(tokenizer), *weights, unit_scales(cfg))


def test_layout_encoder_snaps_the_grounding_heads_reading_of_the_raw_map(tokenizer):
    from blip3o.models.heads import snap_layout, tokens_to_map
    from blip3o.world.spec import NUM_CLASS_IDS, NUM_COLOUR_IDS

    assert NUM_CLASS_IDS == 7  # background and six classes, then eleven colour ids
    torch.manual_seed(0)
    cfg = ModelConfig(generation=GenerationConfig(target="layout"))
    assert cfg.vision.pool == 2
    clip = build_clip(cfg.vision, len(tokenizer))
    head = torch.nn.Linear(cfg.vision.hidden_size, NUM_CLASS_IDS + NUM_COLOUR_IDS)
    scales = unit_scales(cfg)
    scales["feature_mean"] += 3.0  # the layout reads the raw map, not the standardised one
    enc = Encoders(clip.vision_model, build_vae(cfg.vae), cfg.vision.pool, scales, grounding=head)
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        raw = tokens_to_map(clip.vision_model(pixel_values=pixels).last_hidden_state)  # (2, D, 8, 8)
        pooled = torch.nn.functional.avg_pool2d(raw, cfg.vision.pool)  # the generation target's grid
        expected = snap_layout(torch.einsum("gd,bdhw->bghw", head.weight, pooled) + head.bias[:, None, None], 7)
    layout = enc.encoder("layout")(pixels)
    assert layout.shape == (2, *cfg.target_shape) and cfg.decoder_channels == NUM_CLASS_IDS + NUM_COLOUR_IDS
    assert torch.equal(layout, expected)
    bare = Encoders(clip.vision_model, build_vae(cfg.vae), cfg.vision.pool, scales)
    with pytest.raises(ValueError, match="per-patch grounding head"):
        bare.layout(pixels)


def test_masked_head_reads_cells_by_their_factors_and_returns_the_dits_factored_log_probabilities():
    head = MaskedHead(DiTConfig(hidden_size=32, num_layers=1, num_heads=2), 4, 8, patch=2, prior_tokens=3).eval()
    ids = torch.randint(0, LAYOUT_VOCAB + 1, (2, 4, 4))
    cond, sigma = torch.randn(2, 3, 8), torch.tensor([0.3, 1.0])
    rope = torch.view_as_complex(head.rope.float().contiguous())
    mask = torch.ones(2, 3, dtype=torch.bool)
    out = head.dit(
        cell_inputs(ids).float(), 1000 * sigma, head.cond_proj(cond), mask, rope, cross_attention_kwargs={}
    ).sample
    want = cell_log_probs(out[:, :CELL_FACTORS] + head.prior(cond))
    torch.testing.assert_close(head(ids, sigma, cond), want)
    assert head.mask_id == LAYOUT_VOCAB and head.dit.config.in_channels == CELL_FACTORS + 1


def test_cell_factors_give_each_id_its_class_and_colour():
    """cell_inputs writes an id's class and colour one-hot (a mask bit for the mask id), and cell_log_probs
    gives each id the log-probability of its class plus that of its colour, a distribution over the ids."""
    ids = torch.arange(LAYOUT_VOCAB + 1).view(1, 1, -1)
    x = cell_inputs(ids)[0, :, 0].T  # (ids, channels)
    layout = ids_to_layout(ids[..., :-1])[0, :, 0].T  # the ±1 one-hot layout of the real ids
    assert torch.equal(x[:-1, :NUM_CLASS_IDS], (layout[:, :NUM_CLASS_IDS] > 0).long())
    assert torch.equal(x[:-1, NUM_CLASS_IDS:CELL_FACTORS], (layout[:, NUM_CLASS_IDS + 1 :] > 0).long())
    assert torch.equal(x[:, -1], (ids[0, 0] == LAYOUT_VOCAB).long()) and x[-1].sum() == 1
    factors = torch.randn(2, CELL_FACTORS, 3, 3)
    logp = cell_log_probs(factors)
    torch.testing.assert_close(logp.exp().sum(1), torch.ones(2, 3, 3))
    kind, colour = factors[:, :NUM_CLASS_IDS].log_softmax(1), factors[:, NUM_CLASS_IDS:].log_softmax(1)
    red_star = 1 + (SHAPES.index("star")) * (NUM_COLOUR_IDS - 1) + COLOR_NAMES.index("red")
    torch.testing.assert_close(
        logp[:, red_star], kind[:, 1 + SHAPES.index("star")] + colour[:, COLOR_NAMES.index("red")]
    )
    star = ids_to_layout(torch.full((1, 1, 1), red_star))[0, :, 0, 0]
    assert star[1 + SHAPES.index("star")] == 1 and star[NUM_CLASS_IDS + 1 + COLOR_NAMES.index("red")] == 1
    torch.testing.assert_close(logp[:, 0], kind[:, 0])


def test_a_discrete_head_generates_from_the_unmasking_sampler_and_decodes_its_layout(tokenizer):
    pipe = _pipeline(tokenizer, DISCRETE)
    assert isinstance(pipe.model.head, MaskedHead) and pipe.model.head.vocab == LAYOUT_VOCAB
    seen = []
    decode = pipe.decode_features
    pipe.decode_features = lambda features, *args: seen.append(features) or decode(features, *args)
    ids, mask = generation_inputs(tokenizer, ["a photo of two stars"] * 2)
    cells = pipe.sample_cells(pipe.model.condition(ids, mask), [3, 4], steps=3)
    images = pipe("a photo of two stars", num_images=2, seed=3, num_inference_steps=3, decoder_steps=2)
    assert len(images) == 2 and images[0].size == (64, 64)
    assert torch.equal(seen[0], ids_to_layout(cells)) and not torch.equal(cells[0], cells[1])
    with pytest.raises(ConfigError, match="target=layout"):
        GenerationConfig(objective="discrete")


def test_encodings_are_stored_once_and_read_back_only_by_the_same_encoders_and_images(tmp_path, tokenizer):
    """``Encoders.encode_all`` equals the encoders run chunk by chunk; with a cache it writes one file per
    encoding, reads it back without encoding again, and keys it on the weights, the scales and the images."""
    from blip3o.models.heads import ids_to_layout, layout_to_ids

    torch.manual_seed(0)
    cfg = ModelConfig(generation=GenerationConfig(target="layout"))
    clip = build_clip(cfg.vision, len(tokenizer))
    head = torch.nn.Linear(cfg.vision.hidden_size, 18)
    enc = Encoders(clip.vision_model, build_vae(cfg.vae), cfg.vision.pool, unit_scales(cfg), grounding=head)
    images = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8)
    pixels = images.float() / 127.5 - 1
    fresh = {t: enc.encode_all(images, t, chunk=2) for t in ("clip", "latent", "cells")}
    assert torch.allclose(fresh["latent"], enc.latents(pixels), atol=1e-5)
    assert torch.allclose(fresh["clip"], enc.clip(pixels), atol=1e-5)
    assert fresh["cells"].dtype == torch.uint8 and torch.equal(fresh["cells"].long(), layout_to_ids(enc.layout(pixels)))
    assert torch.equal(enc.encode_all(images, "layout"), enc.layout(pixels))  # the layout comes back exactly

    enc.cache = tmp_path / "cache"
    stored = {t: enc.encode_all(images, t) for t in ("clip", "latent", "cells")}
    assert sorted(p.name.split("-")[0] for p in enc.cache.iterdir()) == ["cells", "clip", "latent"]
    enc.vae.encode = enc.vision.forward = None  # reading back must not encode
    assert all(torch.equal(enc.encode_all(images, t), stored[t]) for t in stored)
    del enc.vae.encode, enc.vision.forward

    with torch.no_grad():
        enc.vae.encoder.conv_in.bias.add_(1.0)  # other weights: another file, another encoding
    changed = enc.encode_all(images, "latent")
    assert not torch.allclose(changed, stored["latent"]) and len(list(enc.cache.glob("latent-*"))) == 2
    enc.encode_all(images[:4], "cells")  # other images: another file
    assert len(list(enc.cache.glob("cells-*"))) == 2
    enc.scales = {**enc.scales, "latent_std": enc.scales["latent_std"] * 2}  # other scales: another file
    enc.encode_all(images, "latent")
    assert len(list(enc.cache.glob("latent-*"))) == 3 and not list(enc.cache.glob("*.tmp"))
    assert torch.equal(ids_to_layout(stored["cells"].long()), enc.layout(pixels))
    with pytest.raises(ValueError, match="unknown encoding 'pixels'; allowed: clip, latent, cells, layout"):
        enc.encode_all(images, "pixels")
