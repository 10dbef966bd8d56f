"""BLIP3o-NEXT end to end on a tiny run: rows, stages, freezing, the pipeline (generate, edit, chat), the CLI."""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from blip3o.cli import main
from blip3o.config import dump_yaml
from blip3o.config.presets import resolve
from blip3o.data.next_inputs import image_prompt, image_rows, text_rows
from blip3o.data.processing import IGNORE
from blip3o.data.tokenizer import load_tokenizer
from blip3o.infer.next_pipeline import NextPipeline, load_pipeline
from blip3o.models.heads import PixelDecoder
from blip3o.models.next import BLIP3oNext, add_image_vocabulary, condition_positions
from blip3o.train.recipe import link_shared


@pytest.fixture(scope="module")
def run(tiny_next_run):
    return tiny_next_run


@pytest.fixture(scope="module")
def pipe(run):
    return load_pipeline(run[0])


def _vocab(run_dir, k=64):
    tok = load_tokenizer(run_dir / "tokenizer")
    return tok, add_image_vocabulary(tok, k, 1)


def test_rows_label_only_the_image_and_keep_the_reference_out_of_the_condition(run):
    tok, vocab = _vocab(run[0])
    target = torch.tensor([[3, 1, 4, 1], [5, 9, 2, 6]])
    rows = image_rows(tok, vocab, ["a red circle", "make the star blue"], target, [None, [7, 7, 8, 8]])
    for r in range(2):
        labelled = rows["labels"][r][rows["labels"][r] != IGNORE].tolist()
        assert labelled == [vocab.first_code_id + c for c in target[r].tolist()] + [vocab.im_end]
    cond = condition_positions(rows["input_ids"], rows["attention_mask"], vocab)
    picked = [rows["input_ids"][r][cond[r]].tolist() for r in range(2)]
    assert picked == [[vocab.scale_ids[0], *(vocab.first_code_id + c for c in target[r].tolist())] for r in range(2)]
    # The edit row reads the reference codes (no scale token) after the instruction.
    edit = image_prompt(tok, vocab, "make the star blue", [7, 7, 8, 8])
    start = edit.index(vocab.im_start)
    assert edit[start : start + 6] == [vocab.im_start, *(vocab.first_code_id + c for c in (7, 7, 8, 8)), vocab.im_end]
    assert "make the star blue" in tok.decode(edit[:start])
    assert edit[-2:] == [vocab.im_start, vocab.scale_ids[0]]
    # Text rows: the answer (and its end-of-turn) is all that is labelled.
    text = text_rows(tok, vocab, target, ["What color is the circle?"] * 2, ["red", "blue"])
    labelled = text["labels"][0][text["labels"][0] != IGNORE].tolist()
    assert tok.decode(labelled, skip_special_tokens=True).strip() == "red"
    assert vocab.first_code_id + 3 in text["input_ids"][0].tolist()


def test_edit_rows_put_each_output_code_a_fixed_distance_after_its_reference_code(run):
    """Copying an unchanged code is then one relative offset, whatever the instruction's length."""
    tok, vocab = _vocab(run[0])
    ref, target = [7, 8, 9, 10], torch.tensor([[11, 12, 13, 14]] * 2)
    instructions = ["remove the star", "move the blue circle to the left of the yellow hexagon"]
    rows = image_rows(tok, vocab, instructions, target, [ref, ref])
    offsets = set()
    for r in range(2):
        ids = rows["input_ids"][r].tolist()
        at_ref, at_out = ids.index(vocab.first_code_id + ref[0]), ids.index(vocab.first_code_id + 11)
        offsets.add(at_out - at_ref)
    assert len(offsets) == 1
    lengths = {len(tok(t)["input_ids"]) for t in instructions}
    assert len(lengths) == 2  # the instructions really differ in length


def test_recipe_trains_the_tokenizer_and_keeps_sana_frozen_but_its_listed_parts(run):
    out, summaries = run
    assert list(summaries) == ["clip", "vae", "decoder", "image_tokenizer", "next", "instruct"]
    book = json.loads((out / "image_tokenizer" / "codebook.json").read_text())
    assert 0 < book["usage"] <= 1 and 1 <= book["perplexity"] <= 64
    decoder = load_file(str(out / "decoder" / "model.safetensors"))
    for stage in ("next", "instruct"):
        weights = load_file(str(out / stage / "model.safetensors"))
        for key, value in decoder.items():
            name = key.removeprefix("dit.")
            if name.startswith(("caption_projection", "caption_norm", "patch_embed")):
                continue
            torch.testing.assert_close(weights[f"dit.{name}"], value, rtol=0, atol=0)
        # The listed parts did train: the patch embedding's decoder channels moved.
        moved = weights["dit.patch_embed.proj.weight"][:, : decoder["dit.patch_embed.proj.weight"].shape[1]]
        assert not torch.equal(moved, decoder["dit.patch_embed.proj.weight"])
    nxt, ins = (load_file(str(out / s / "model.safetensors")) for s in ("next", "instruct"))
    assert not torch.equal(
        nxt["backbone.model.layers.0.mlp.up_proj.weight"], ins["backbone.model.layers.0.mlp.up_proj.weight"]
    )


def test_sana_starts_as_the_pixel_decoder(run):
    """From the decoder's weights, the NEXT velocity with the condition's image part equal to CLIP tokens
    (and its scale token masked out) is the pixel decoder's velocity, with or without a reference."""
    out, _ = run
    cfg = resolve("tiny-next")
    _, vocab = _vocab(out, cfg.next.codebook_size)
    c, side, _ = cfg.model.latent_shape
    decoder = PixelDecoder(cfg.model.decoder, c, side, cfg.model.vision.hidden_size)
    decoder.load_state_dict(load_file(str(out / "decoder" / "model.safetensors")))
    model = BLIP3oNext.from_config(cfg.next, vocab)
    model.load_decoder({k[4:]: v for k, v in load_file(str(out / "decoder" / "model.safetensors")).items()})
    g = torch.Generator().manual_seed(0)
    x, tokens = torch.randn(2, c, side, side, generator=g), torch.randn(2, cfg.next.image_tokens, 64, generator=g)
    sigma = torch.tensor([0.3, 0.8])
    cond = torch.cat([torch.randn(2, 1, 64, generator=g), tokens], dim=1)
    mask = torch.ones(2, cond.shape[1])
    mask[:, 0] = 0
    with torch.no_grad():
        want = decoder(x, sigma, tokens)
        got = model.velocity(x, sigma, cond, cond_mask=mask)
        with_ref = model.velocity(x, sigma, cond, cond_mask=mask, reference=torch.randn(x.shape, generator=g))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(with_ref, want, rtol=1e-4, atol=1e-5)


def test_batched_prompts_match_one_at_a_time(pipe):
    prompts = ["a photo of a red circle", "a photo of two blue stars and a green square"]
    batch = pipe(prompts, num_images=2, seed=[5, 9])
    alone = [im for p, s in zip(prompts, [5, 9], strict=True) for im in pipe(p, num_images=2, seed=s)]
    for a, b in zip(batch, alone, strict=True):
        np.testing.assert_allclose(np.asarray(a, dtype=float), np.asarray(b, dtype=float), atol=1)
    assert batch[0].size == (32, 32)
    assert not np.array_equal(np.asarray(batch[0]), np.asarray(batch[1]))  # seed s and s + 1 differ


def test_edit_depends_on_the_reference_image(pipe, run):
    from blip3o.data.world_data import load_split

    data = load_split(run[0] / "world", "heldout")
    scenes = [data.edited[0], data.edited[1]]
    from blip3o.data.processing import to_images

    images = to_images(data.images[scenes].float().div(127.5).sub(1))
    same = pipe.edit([images[0], images[1]], "make the red circle blue", seed=[3, 3])
    again = pipe.edit(images[0], "make the red circle blue", seed=3)
    np.testing.assert_allclose(np.asarray(same[0], dtype=float), np.asarray(again[0], dtype=float), atol=1)
    assert not np.array_equal(np.asarray(same[0]), np.asarray(same[1]))
    assert isinstance(pipe.chat(images[0], "What color is the circle?"), str)
    with pytest.raises(ValueError, match="instructions for"):
        pipe.edit(images, ["a", "b", "c"])


def test_load_pipeline_picks_the_model_of_the_run(pipe, tmp_path, run):
    assert isinstance(pipe, NextPipeline)
    with pytest.raises(FileNotFoundError, match=r"config\.yaml"):
        load_pipeline(tmp_path)
    (tmp_path / "blip3o").mkdir()
    dump_yaml(resolve("tiny-debug"), tmp_path / "blip3o" / "config.yaml")
    with pytest.raises(ValueError, match="not a BLIP3o-NEXT run"):
        NextPipeline.from_run(tmp_path / "blip3o")


def test_reuse_links_shared_stages_and_refuses_a_different_config(run, tmp_path):
    out, _ = run
    cfg = resolve("tiny-next")
    linked = link_shared(cfg, tmp_path, out)
    assert set(linked) == {"world", "tokenizer", "clip", "vae", "decoder", "scales.safetensors", "cache"}
    assert (tmp_path / "clip").resolve() == (out / "clip").resolve()
    other = tmp_path / "other"
    other.mkdir()
    dump_yaml(
        replace(cfg, model=replace(cfg.model, vae=replace(cfg.model.vae, latent_channels=8))), other / "config.yaml"
    )
    with pytest.raises(ValueError, match=r"differs in model\.vae"):
        link_shared(cfg, tmp_path / "new", other)
    dump_yaml(replace(cfg, recipe=replace(cfg.recipe, clip_local_weight=10.0)), other / "config.yaml")
    with pytest.raises(ValueError, match=r"differs in recipe\.clip_local_weight"):
        link_shared(cfg, tmp_path / "new", other)


def test_cli_generate_edit_and_eval_edit(run, tmp_path, capsys):
    out, _ = run
    assert main(["generate", str(out), "--prompt", "a red circle", "-n", "2", "--out", str(tmp_path / "g")]) == 0
    image = tmp_path / "g" / "0000.png"
    assert (
        main(
            [
                "edit",
                str(out),
                "--image",
                str(image),
                "--prompt",
                "make the red circle blue",
                "--out",
                str(tmp_path / "e"),
            ]
        )
        == 0
    )
    assert (tmp_path / "e" / "0000.png").is_file()
    # Sampling overrides reach the edit: a huge copy prior with the blend returns the image itself.
    kept = ["--out", str(tmp_path / "k"), "next.edit_blend=true", "next.copy_bias=1e4"]
    assert main(["edit", str(out), "--image", str(image), "--prompt", "make the red circle blue", *kept]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "k" / "0000.png")), np.asarray(Image.open(image)))
    # ... and a generation: one SANA step instead of the config's draws another image from the same seed.
    assert (
        main(
            ["generate", str(out), "--prompt", "a red circle", "-n", "1", "--out", str(tmp_path / "s1"), "next.steps=1"]
        )
        == 0
    )
    first, one_step = (np.asarray(Image.open(tmp_path / d / "0000.png")) for d in ("g", "s1"))
    assert not np.array_equal(first, one_step)
    assert main(["eval", "edit", str(out), "--limit", "3", "--out", str(tmp_path / "ev")]) == 0
    lines = (tmp_path / "ev" / "edit_results.jsonl").read_text().splitlines()
    summary = json.loads(lines[-1])["summary"]
    assert summary["n"] == 3 and len(lines) == 4
    assert 0 <= summary["edit_accuracy"] <= 1 and 0 <= summary["consistency"] <= 1
    assert len(list((tmp_path / "ev" / "images").glob("*_edit.png"))) == 3


def test_sampling_overrides_reach_the_pipeline(run):
    """top-k 1 and temperature 0 both decode greedily, so after ``apply_sampling`` they give the same images."""
    from blip3o.config.io import apply_overrides

    pipe = load_pipeline(run[0])
    cfg = resolve("tiny-next")
    pipe.apply_sampling(apply_overrides(cfg, ["next.top_k=1"]))
    assert pipe.next.top_k == 1
    greedy_k = pipe("a photo of a red circle", seed=0)
    pipe.apply_sampling(apply_overrides(cfg, ["next.temperature=0"]))
    greedy_t = pipe("a photo of a red circle", seed=0)  # SANA noise is the same seed, so images match
    np.testing.assert_allclose(np.asarray(greedy_k[0], dtype=float), np.asarray(greedy_t[0], dtype=float), atol=1)


def test_edit_rows_corrupt_only_the_written_codes_of_edit_rows(run):
    from blip3o.data.processing import IGNORE
    from blip3o.train.recipe import make_task

    out, _ = run
    cfg = resolve("tiny-next")
    task = make_task("next", replace(cfg, next=replace(cfg.next, edit_fraction=0.5, edit_corruption=0.5)), out)
    batch = task.batch(0, 0, 0, 1)
    rows = batch["image"]
    n_t2i = int((batch["reference"].flatten(1).abs().sum(1) == 0).sum())
    # Labels are the true codes: where the input was corrupted it differs from the label of that token.
    shifted = rows["labels"]
    written = condition_positions(rows["input_ids"], rows["attention_mask"], task.vocab) & task.vocab.is_code(
        rows["input_ids"]
    )
    changed = written & (rows["input_ids"] != shifted) & (shifted != IGNORE)
    assert n_t2i < rows["input_ids"].shape[0]  # the batch holds edit rows
    assert not changed[:n_t2i].any()  # text-to-image rows are left alone
    n = int(written[n_t2i:].sum())
    share = changed[n_t2i:].sum() / n
    # About half, less the codes redrawn to themselves: within 4 binomial standard deviations of 0.5.
    assert abs(share - 0.5) < 4 * (0.25 / n) ** 0.5, (share, n)


def test_edit_strength_starts_from_the_noised_reference(run):
    """With ``next.edit_strength`` near 0 SANA starts almost at the reference's latents and barely moves, so
    the edit is the VAE's reconstruction of the reference."""
    from blip3o.config.io import apply_overrides
    from blip3o.data.processing import to_images, to_pixels
    from blip3o.data.world_data import load_split

    pipe = load_pipeline(run[0])
    pipe.apply_sampling(apply_overrides(resolve("tiny-next"), ["next.edit_strength=0.001"]))
    source = to_images(to_pixels(load_split(run[0] / "world", "heldout").images[:1]))[0]
    edited = pipe.edit(source, "make the red circle blue", seed=0)[0]
    pixels = to_pixels([source])
    recon = to_images(pipe.encoders.decode(pipe.encoders.latents(pixels)))[0]
    np.testing.assert_allclose(np.asarray(edited, dtype=float), np.asarray(recon, dtype=float), atol=3)


def test_text_rows_ask_for_the_world_words_and_target_their_scenes(run):
    from blip3o.train.next_tasks import encode_images
    from blip3o.train.recipe import make_task

    out, _ = run
    cfg = resolve("tiny-next")
    mix = {"edit_fraction": 0.0, "understanding_fraction": 0.0, "text_fraction": 1.0}
    task = make_task("next", replace(cfg, next=replace(cfg.next, **mix)), out)
    batch = task.batch(0, 0, 0, 1)
    n_text = len(task.data.text_meta)
    assert n_text > 0
    picked = [i % n_text for i in task.indices(0, 0, 0, 1)]
    prompts = [task.tokenizer.decode(row, skip_special_tokens=True) for row in batch["image"]["input_ids"]]
    for prompt, w in zip(prompts, picked, strict=True):
        assert f'"{task.data.text_meta[w]["text"]}"' in prompt
    torch.testing.assert_close(batch["latents"], task.encoded["text_latents"][picked])
    side = task.data.images.shape[-1]  # text scenes are resized to the scenes' side before encoding
    resized = torch.nn.functional.interpolate(
        task.data.text_images[picked].float(), size=(side, side), mode="bilinear", antialias=True
    )
    _, latents, _ = encode_images(resized.round().clamp(0, 255).to(torch.uint8), task.enc, None)
    torch.testing.assert_close(batch["latents"], latents)
    assert not batch["reference"].any()


def test_a_finished_stage_encodes_nothing_and_a_batch_serves_the_encoders_codes(run):
    from blip3o.data.processing import to_pixels
    from blip3o.models.heads import map_to_tokens
    from blip3o.train.next_tasks import image_codes
    from blip3o.train.recipe import make_task

    out, _ = run
    task = make_task("next", resolve("tiny-next"), out)
    assert "encoded" not in task.__dict__  # rerunning a finished recipe builds the task, never a batch
    idx = task.indices(0, 0, 0, 1)
    with torch.no_grad():
        codes = image_codes(task.enc, task.image_tokenizer, to_pixels(task.data.images[idx]))
    assert torch.equal(task.encoded["codes"][idx], codes)
    tok_task = make_task("image_tokenizer", resolve("tiny-next"), out)
    idx = tok_task.indices(1, 0, 0, 1)
    with torch.no_grad():
        features = map_to_tokens(tok_task.enc.clip(to_pixels(tok_task.data.images[idx])))
    torch.testing.assert_close(tok_task.batch(1, 0, 0, 1)["features"], features)


def test_kept_mask_marks_unchanged_codes_with_a_margin_on_the_latent_grid():
    from blip3o.infer.next_pipeline import kept_mask

    reference = torch.zeros(2, 16, dtype=torch.long)
    codes = reference.clone()
    codes[0, 0] = 5  # code (0, 0) of row 0 changed; row 1 copies every code
    keep = kept_mask(codes, reference, latent_side=8, margin=1)  # 4×4 codes, 2×2 latents each
    expected = torch.ones(2, 1, 8, 8)
    expected[0, 0, :4, :4] = 0  # codes (0..1, 0..1): the changed one and its margin
    assert torch.equal(keep, expected)
    expected[0, 0, :4, :4], expected[0, 0, :2, :2] = 1, 0  # no margin: the changed code alone
    assert torch.equal(kept_mask(codes, reference, latent_side=8, margin=0), expected)
    with pytest.raises(ValueError, match="square code map"):
        kept_mask(torch.zeros(1, 15, dtype=torch.long), torch.zeros(1, 15, dtype=torch.long), 8, margin=1)


def test_blend_velocity_lands_on_the_reference_where_kept_under_cfg():
    from blip3o.diffusion.sampler import euler_sample
    from blip3o.infer.next_pipeline import blend_velocity

    g = torch.Generator().manual_seed(0)
    reference, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    keep = torch.zeros(2, 1, 8, 8)
    keep[:, :, 4:] = 1
    weight = torch.randn(4, 4, generator=g)

    def velocity(x, sigma, cond):  # any model: channels mixed, the map's mean (spatial context), the condition
        return torch.einsum("oc,bchw->bohw", weight, x) + x.mean((2, 3), keepdim=True) + cond.view(-1, 1, 1, 1)

    cond, null = torch.ones(2), torch.zeros(2)
    blended = euler_sample(
        blend_velocity(velocity, reference, keep), noise, cond, uncond=null, num_steps=7, guidance_scale=3.0
    )
    plain = euler_sample(velocity, noise, cond, uncond=null, num_steps=7, guidance_scale=3.0)
    torch.testing.assert_close(blended[:, :, 4:], reference[:, :, 4:], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain[:, :, 4:], reference[:, :, 4:], atol=0.1)
    assert not torch.allclose(blended[:, :, :4], plain[:, :, :4])  # the redrawn part sees the kept context


def test_edit_blend_keeps_the_reference_where_the_codes_are_copied(run, monkeypatch, copy_reference_codes):
    """When the written codes equal the reference's, a blended edit is the reference itself, pixel for pixel;
    where one code differs, that cell and its margin are redrawn and the rest is still the reference's."""
    from blip3o.config.io import apply_overrides
    from blip3o.data.processing import to_images, to_pixels
    from blip3o.data.world_data import load_split

    pipe = load_pipeline(run[0])
    copying = copy_reference_codes(pipe)
    source = to_images(to_pixels(load_split(run[0] / "world", "heldout").images[:1]))[0]
    recon = to_images(pipe.encoders.decode(pipe.encoders.latents(to_pixels([source]))))[0]
    plain = pipe.edit(source, "make the red circle blue", seed=0)[0]
    pipe.apply_sampling(apply_overrides(resolve("tiny-next"), ["next.edit_blend=true"]))
    blended = pipe.edit(source, "make the red circle blue", seed=0)[0]
    np.testing.assert_array_equal(np.asarray(blended), np.asarray(source))
    assert np.abs(np.asarray(recon, dtype=float) - np.asarray(source, dtype=float)).max() > 10  # not the VAE's
    assert np.abs(np.asarray(plain, dtype=float) - np.asarray(recon, dtype=float)).max() > 10

    def one_changed(input_ids, attention_mask, seeds, cfg, references=None):
        out = copying(input_ids, attention_mask, seeds, cfg, references)
        out.tokens[:, -1] = pipe.model.vocab.first_code_id + (references[0][-1] + 1) % pipe.next.codebook_size
        return out

    monkeypatch.setattr(pipe, "sample_tokens", one_changed)
    edited = np.asarray(pipe.edit(source, "make the red circle blue", seed=0)[0], dtype=float)
    cell = source.size[0] // math.isqrt(pipe.next.image_tokens)  # pixels a code covers
    redrawn = 2 * cell  # the last code and one code of margin: the bottom-right corner
    src = np.asarray(source, dtype=float)
    np.testing.assert_array_equal(edited[:-redrawn], src[:-redrawn])
    np.testing.assert_array_equal(edited[:, :-redrawn], src[:, :-redrawn])
    assert np.abs(edited[-redrawn:, -redrawn:] - src[-redrawn:, -redrawn:]).max() > 10


def test_copy_bias_makes_an_edit_keep_the_reference_codes(run):
    """With a large ``next.copy_bias`` the written codes are the reference's, so a blended edit is the source
    image pixel for pixel; text-to-image has no reference and is unchanged by it."""
    from blip3o.config.io import apply_overrides
    from blip3o.data.processing import to_images, to_pixels
    from blip3o.data.world_data import load_split

    pipe = load_pipeline(run[0])
    source = to_images(to_pixels(load_split(run[0] / "world", "heldout").images[:1]))[0]
    before = pipe("a photo of a red circle", seed=4)[0]
    pipe.apply_sampling(apply_overrides(resolve("tiny-next"), ["next.edit_blend=true"]))
    free = pipe.edit(source, "make the red circle blue", seed=0)[0]
    assert not np.array_equal(np.asarray(free), np.asarray(source))
    pipe.apply_sampling(apply_overrides(resolve("tiny-next"), ["next.edit_blend=true", "next.copy_bias=1e4"]))
    kept = pipe.edit(source, "make the red circle blue", seed=0)[0]
    np.testing.assert_array_equal(np.asarray(kept), np.asarray(source))
    np.testing.assert_array_equal(np.asarray(pipe("a photo of a red circle", seed=4)[0]), np.asarray(before))
