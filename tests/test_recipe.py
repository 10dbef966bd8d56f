"""The BLIP3-o shapes recipe end to end at tiny size: stages, sequential freezing, CLI verbs on a run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from blip3o.cli import main
from blip3o.config import resolve
from blip3o.infer.pipeline import BLIP3oPipeline
from blip3o.models.build import load_weights
from blip3o.train.recipe import run_recipe


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    run_recipe(resolve("tiny-debug"), out, progress=False)
    return out


def test_every_stage_ran_and_wrote_its_artifacts(tiny_run):
    for stage in ("clip", "vae", "decoder", "understanding", "generation"):
        summary = json.loads((tiny_run / stage / "summary.json").read_text())
        assert summary["steps"] == 4
        for name in ("model.safetensors", "metrics.jsonl", "curves.png", "config.yaml"):
            assert (tiny_run / stage / name).is_file(), (stage, name)
    scales = load_file(str(tiny_run / "scales.safetensors"))
    assert scales["feature_mean"].shape == (64, 4, 4) and bool((scales["feature_std"] > 0).all())
    assert scales["latent_mean"].shape == (4, 1, 1) and bool((scales["latent_std"] > 0).all())


def test_sequential_training_leaves_backbone_and_answers_bit_identical(tiny_run):
    und = load_file(str(tiny_run / "understanding" / "model.safetensors"))
    gen = load_file(str(tiny_run / "generation" / "model.safetensors"))
    frozen = [k for k in und if k.startswith(("backbone.", "vision.", "projector."))]
    assert frozen
    for key in frozen:
        assert torch.equal(und[key], gen[key]), key
    assert any(not torch.equal(und[k], gen[k]) for k in und if k.startswith(("head.", "queries")))
    pipe = BLIP3oPipeline.from_run(tiny_run)
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    after = pipe.chat([image, image], ["What colour is the circle?", "Describe the image."], max_new_tokens=6)
    load_weights(pipe.model, tiny_run / "understanding" / "model.safetensors")
    before = pipe.chat([image, image], ["What colour is the circle?", "Describe the image."], max_new_tokens=6)
    assert before == after


def test_a_tower_trained_for_understanding_leaves_the_frozen_target_tower_alone(tiny_run, tmp_path):
    """With the vision tower trainable in the understanding stage, the pipeline's model reads images
    with the trained tower while generation targets and the pixel decoder keep the frozen mini-CLIP."""
    for part in ("world", "tokenizer", "clip", "vae", "decoder", "scales.safetensors"):
        (tmp_path / part).symlink_to(tiny_run / part)
    cfg = resolve("tiny-debug", ["recipe.stages=[understanding]", "recipe.understanding.trainable=[vision]"])
    run_recipe(cfg, tmp_path, progress=False)
    pipe = BLIP3oPipeline.from_run(tmp_path)
    clip = load_file(str(tiny_run / "clip" / "model.safetensors"))
    und = load_file(str(tmp_path / "understanding" / "model.safetensors"))
    key = "embeddings.patch_embedding.weight"
    assert not torch.equal(und[f"vision.{key}"], clip[f"clip.vision_model.{key}"])
    assert torch.equal(pipe.model.vision.state_dict()[key], und[f"vision.{key}"])
    assert torch.equal(pipe.encoders.vision.state_dict()[key], clip[f"clip.vision_model.{key}"])
    # no generation stage yet: the run chats, and asking it for images says what is missing
    assert len(pipe.chat([Image.new("RGB", (32, 32))], ["Describe the image."], max_new_tokens=2)) == 1
    with pytest.raises(ValueError, match="generation stage has not finished"):
        pipe("a photo of a star")


def test_rerun_skips_finished_stages(tiny_run):
    mtime = (tiny_run / "generation" / "model.safetensors").stat().st_mtime_ns
    run_recipe(resolve("tiny-debug"), tiny_run, progress=False)
    assert (tiny_run / "generation" / "model.safetensors").stat().st_mtime_ns == mtime


def test_cli_verbs_on_a_run(tiny_run, tmp_path, capsys):
    assert (
        main(
            [
                "generate",
                str(tiny_run),
                "--prompt",
                "a photo of two stars",
                "-n",
                "2",
                "--steps",
                "2",
                "--out",
                str(tmp_path / "gen"),
            ]
        )
        == 0
    )
    images = sorted((tmp_path / "gen").glob("*.png"))
    assert len(images) == 2 and Image.open(images[0]).size == (32, 32)
    assert (
        main(
            [
                "chat",
                str(tiny_run),
                "--image",
                str(images[0]),
                "--prompt",
                "What colour is the star?",
                "--max-new-tokens",
                "3",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["eval", "geneval", str(tiny_run), "eval.n_prompts=6", "eval.images_per_prompt=2"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["images"] == 12 and 0.0 <= summary["overall"] <= 1.0
    folders = list((tiny_run / "eval" / "geneval" / "images").iterdir())
    assert len(folders) == 6 and (folders[0] / "metadata.jsonl").is_file()
    assert main(["eval", "vqa", str(tiny_run), "--limit", "8"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["questions"] == 8
    assert main(["eval", "reconstruction", str(tiny_run), "--n", "6"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["images"] == 6 and 0.0 <= summary["vae"] <= 1.0 and 0.0 <= summary["decoder"] <= 1.0


def test_train_cli_rejects_mismatched_sizes(tmp_path, capsys):
    assert main(["train", "tiny-debug", "--out", str(tmp_path), "world.size=48"]) == 2
    assert "model.vision.image_size" in capsys.readouterr().err


def test_study_trains_every_variant_and_writes_the_report(tmp_path):
    from blip3o.train.study import run_study

    results = run_study(
        resolve("tiny-debug", ["eval.n_prompts=6"]), tmp_path, progress=False, n_diversity=3, k=2, vqa_limit=8
    )
    assert set(results) == {"clip-flow", "clip-mse", "latent-flow", "clip-flow-joint"}
    for r in results.values():
        assert 0 <= r["geneval"]["overall"] <= 1 and r["diversity"] >= 0 and r["steps"] == 4
    # sequential variants keep the understanding answers; the joint one trains the backbone
    assert results["clip-flow"]["vqa_before"] == results["clip-flow"]["vqa_after"]
    table = (tmp_path / "study.md").read_text()
    assert table.count("\n") == 2 + 4 and (tmp_path / "study.png").is_file()


def test_interrupted_stage_needs_resume_and_then_matches(tmp_path, capsys):
    import shutil

    args = [
        "recipe.stages=[clip]",
        "recipe.clip.steps=6",
        "recipe.clip.ckpt_every=3",
        "recipe.clip.keep_checkpoints=2",
        "recipe.clip.log_every=1",
    ]
    run_recipe(resolve("tiny-debug", args), tmp_path / "a", progress=False)
    run_recipe(resolve("tiny-debug", args), tmp_path / "b", progress=False)
    # a crash after step 5: the step-6 checkpoint, the weights and the summary never got written
    shutil.rmtree(tmp_path / "b" / "clip" / "checkpoints" / "step-000006")
    (tmp_path / "b" / "clip" / "summary.json").unlink()
    cli = ["train", "tiny-debug", "--out", str(tmp_path / "b"), *args]
    assert main(cli) == 2
    assert "resume" in capsys.readouterr().err
    assert main([*cli, "--resume"]) == 0
    losses = [
        [json.loads(x)["loss"] for x in (tmp_path / r / "clip" / "metrics.jsonl").read_text().splitlines()]
        for r in ("a", "b")
    ]
    assert len(losses[0]) == 6 and losses[0] == losses[1]


def test_a_run_given_only_a_vae_trains_its_clip_before_measuring_scales(tiny_run, tmp_path):
    """Linking a finished VAE (and world, tokenizer) into a new run must not make the recipe measure
    target scales before the run's own mini-CLIP exists."""
    for name in ("world", "tokenizer", "vae"):
        (tmp_path / name).symlink_to(tiny_run / name, target_is_directory=True)
    run_recipe(resolve("tiny-debug"), tmp_path, progress=False)
    assert (tmp_path / "clip" / "model.safetensors").is_file()
    assert (tmp_path / "scales.safetensors").is_file()


def test_decoder_and_generation_batches_serve_the_encoders_outputs(tiny_run):
    """Targets are encoded once per stage; a batch holds exactly what the frozen encoders give its images."""
    from blip3o.data.processing import to_pixels
    from blip3o.models.heads import map_to_tokens
    from blip3o.train.recipe import make_task

    cfg = resolve("tiny-debug")
    dec, gen = make_task("decoder", cfg, tiny_run), make_task("generation", cfg, tiny_run)
    idx = dec.indices(3, 0, 0, 1)
    pixels = to_pixels(dec.data.images[idx])
    with torch.no_grad():
        clip, latents = dec.enc.clip(pixels), dec.enc.latents(pixels)
    batch = dec.batch(3, 0, 0, 1)
    torch.testing.assert_close(batch["clip"], map_to_tokens(clip))
    torch.testing.assert_close(batch["latents"], latents)
    torch.testing.assert_close(gen.batch(3, 0, 0, 1)["x0"], clip)


def test_generation_rows_ask_by_prompt_or_caption(tiny_run):
    from blip3o.data.processing import generation_inputs
    from blip3o.train.recipe import make_task

    def asked(fraction: float) -> tuple:
        task = make_task(
            "generation", resolve("tiny-debug", [f"recipe.generation_prompt_fraction={fraction}"]), tiny_run
        )
        return task, task.batch(2, 0, 0, 1)["input_ids"]

    for fraction, key in ((1.0, "prompt"), (0.0, "caption")):
        task, ids = asked(fraction)
        texts = [task.data.meta[i][key] for i in task.indices(2, 0, 0, 1)]
        assert torch.equal(ids, generation_inputs(task.tokenizer, texts)[0])


def test_a_prior_head_trains_its_map_by_mse_and_generates(tiny_run, tmp_path):
    """With ``generation.prior`` the stage's loss adds the prior's MSE to x0 (with its weight) to the flow
    loss, and a run trained so samples images through the pipeline."""
    from blip3o.diffusion.flow import flow_loss
    from blip3o.train.recipe import make_task
    from blip3o.train.tasks import flow_step

    overrides = [
        "model.generation.prior=true",
        "model.generation.prediction=sample",
        "model.generation.prior_weight=0.5",
    ]
    task = make_task("generation", resolve("tiny-debug", overrides), tiny_run)
    model, batch = task.build_model(), task.batch(1, 0, 0, 1)
    losses = task.loss(model, batch)
    torch.testing.assert_close(losses["loss"], losses["gen"] + 0.5 * losses["prior"])
    gen = task.cfg.generation
    keep = flow_step(gen.cond_dropout, gen.shift, gen.timestep_sampling, batch["x0"], batch["seed"])[3]
    with torch.no_grad():
        cond = model.condition(batch["input_ids"], batch["attention_mask"]) * keep[:, None, None]
        torch.testing.assert_close(losses["prior"], flow_loss(model.head.prior(cond), batch["x0"]))

    for part in ("world", "tokenizer", "clip", "vae", "decoder", "understanding", "scales.safetensors"):
        (tmp_path / part).symlink_to(tiny_run / part)
    run_recipe(resolve("tiny-debug", ["recipe.stages=[generation]", *overrides]), tmp_path, progress=False)
    metrics = [json.loads(line) for line in (tmp_path / "generation" / "metrics.jsonl").read_text().splitlines()]
    assert all("prior" in m for m in metrics if "loss" in m)
    pipe = BLIP3oPipeline.from_run(tmp_path)
    assert pipe.model.head.prior is not None
    images = pipe(["a photo of a star", "a photo of two red circles"], seed=0, num_inference_steps=2)
    assert len(images) == 2 and images[0].size == images[1].size


def test_decoder_noise_augmentation_perturbs_each_training_map_by_at_most_its_level(tiny_run):
    from blip3o.train.recipe import make_task
    from blip3o.train.tasks import flow_step

    seen = []

    def model(x, sigma, clip):
        seen.append(clip)
        return torch.zeros_like(x)

    for level in (0.0, 0.5):
        task = make_task("decoder", resolve("tiny-debug", [f"model.decoder.noise_augment={level}"]), tiny_run)
        batch = task.batch(2, 0, 0, 1)
        task.loss(model, batch)
        keep = flow_step(task.cfg.decoder.cond_dropout, 1.0, "uniform", batch["latents"], batch["seed"])[3]
        delta = seen[-1] - batch["clip"] * keep[:, None, None]
        if level == 0:
            assert torch.equal(delta, torch.zeros_like(delta))
            continue
        std = delta.std(dim=(1, 2))[keep.bool()]
        assert bool((std < 1.1 * level).all()) and bool((std > 0).all()) and float(std.std()) > 0.01
    with pytest.raises(ValueError, match=r"decoder\.noise_augment"):
        resolve("tiny-debug", ["model.decoder.noise_augment=-1"])


def test_clip_stage_adds_the_shift_loss_with_its_weight(tiny_run):
    """``recipe.clip_shift_weight`` > 0 gives each clip batch a moved copy of its images (less than half a
    patch) and adds that multiple of the shift loss, recomputed from the tower's features of both; at 0
    neither the copy nor the loss is made."""
    from blip3o.config.checks import ConfigError
    from blip3o.train.recipe import make_task
    from blip3o.train.tasks import shift_loss

    plain = make_task("clip", resolve("tiny-debug", ["recipe.clip_shift_weight=0"]), tiny_run)
    torch.manual_seed(0)
    model, batch = plain.build_model(), plain.batch(1, 0, 0, 1)
    assert batch["shifted"] is None
    base = plain.loss(model, batch)
    assert "shift" not in base

    task = make_task("clip", resolve("tiny-debug", ["recipe.clip_shift_weight=2"]), tiny_run)
    shifted = task.batch(1, 0, 0, 1)
    assert torch.equal(shifted["pixels"], batch["pixels"]) and shifted["shifted"].shape == batch["pixels"].shape
    assert not torch.equal(shifted["shifted"], batch["pixels"])
    torch.testing.assert_close(shifted["shifted"], task.batch(1, 0, 0, 1)["shifted"])  # seeded by the step
    losses = task.loss(model, shifted)
    with torch.no_grad():
        vision = model.clip.vision_model
        a = vision(pixel_values=shifted["pixels"]).last_hidden_state
        expected = shift_loss(a, vision(pixel_values=shifted["shifted"]).last_hidden_state)
    torch.testing.assert_close(losses["shift"], expected)
    assert float(expected) > 0
    torch.testing.assert_close(losses["loss"], base["loss"] + 2.0 * expected)
    with pytest.raises(ConfigError, match=r"recipe\.clip_shift_weight"):
        resolve("tiny-debug", ["recipe.clip_shift_weight=-1"])


def test_clip_stage_adds_the_locality_loss_with_its_weight(tiny_run):
    """``recipe.clip_local_weight`` adds that multiple of the locality loss (recomputed from the model's
    patch features and the batch's empty patches) to the clip stage's loss; at 0 it is logged only."""
    from blip3o.config.checks import ConfigError
    from blip3o.train.recipe import make_task
    from blip3o.train.tasks import empty_patches, locality_loss

    losses = {}
    for weight in (0.0, 2.0):
        task = make_task("clip", resolve("tiny-debug", [f"recipe.clip_local_weight={weight}"]), tiny_run)
        torch.manual_seed(0)
        model, batch = task.build_model(), task.batch(1, 0, 0, 1)
        idx = task.indices(1, 0, 0, 1)
        assert torch.equal(batch["empty"], empty_patches([task.data.meta[i] for i in idx], task.cfg.vision.grid))
        losses[weight] = task.loss(model, batch)
        with torch.no_grad():
            patches = model.clip.vision_model(pixel_values=batch["pixels"]).last_hidden_state
            expected = locality_loss(patches - model.background, batch["empty"])
        torch.testing.assert_close(losses[weight]["local"], expected)
    assert float(losses[0.0]["local"]) > 0
    torch.testing.assert_close(losses[2.0]["loss"], losses[0.0]["loss"] + 2.0 * losses[0.0]["local"])
    with pytest.raises(ConfigError, match=r"recipe\.clip_local_weight"):
        resolve("tiny-debug", ["recipe.clip_local_weight=-1"])


def test_stochastic_head_sampling_gives_a_batch_what_its_prompts_get_alone(tiny_run):
    from blip3o.config import RunConfig
    from blip3o.config.io import apply_overrides, load_yaml

    pipe = BLIP3oPipeline.from_run(tiny_run)
    ode = pipe(["a photo of two stars"], seed=[5], num_inference_steps=4)[0]
    pipe.apply_sampling(apply_overrides(load_yaml(tiny_run / "config.yaml", RunConfig), ["model.generation.eta=1"]))
    prompts = ["a photo of two stars", "a photo of a red circle and a blue square"]
    batch = pipe(prompts, seed=[5, 9], num_inference_steps=4)
    alone = [pipe([p], seed=[s], num_inference_steps=4)[0] for p, s in zip(prompts, [5, 9], strict=True)]
    for b, a in zip(batch, alone, strict=True):
        np.testing.assert_allclose(np.asarray(b, dtype=float), np.asarray(a, dtype=float), atol=1)
    assert not np.array_equal(np.asarray(batch[0]), np.asarray(ode))


def test_a_layout_of_cells_trains_the_tower_on_the_fine_grid_and_the_head_and_decoder_on_its_reading(
    tiny_run, tmp_path
):
    """``vision.grounding_cells=2``: the clip stage's grounding head labels 2×2 cells of each patch, the head
    generates the 16×16 reading and the decoder renders it."""
    from blip3o.data.processing import to_pixels
    from blip3o.models.heads import map_to_tokens
    from blip3o.train.recipe import make_task

    overrides = ["model.generation.target=layout", "model.vision.grounding_cells=2"]
    for part in ("world", "tokenizer", "vae"):
        (tmp_path / part).symlink_to(tiny_run / part)
    run_recipe(resolve("tiny-debug", overrides), tmp_path, progress=False)
    weights = load_file(tmp_path / "clip" / "model.safetensors")
    assert weights["patches.weight"].shape[0] == 4 * 18
    cfg = resolve("tiny-debug", overrides)
    gen = make_task("generation", cfg, tmp_path)
    side = cfg.model.vision.target_grid * 2
    layout = gen.enc.layout(to_pixels(gen.data.images[:3]))
    assert layout.shape == (3, 18, side, side) == (3, *cfg.model.target_shape)
    assert torch.equal(make_task("decoder", cfg, tmp_path).targets[0][:3], map_to_tokens(layout))
    images = BLIP3oPipeline.from_run(tmp_path)(["a photo of a star"], seed=0, num_inference_steps=2)
    assert images[0].size == (cfg.model.vision.image_size,) * 2


def test_a_layout_run_trains_on_the_grounded_reading_and_decodes_snapped_samples(tiny_run, tmp_path, capsys):
    """``generation.target=layout``: the decoder and the head train on the tower's grounded reading of each
    image, and the pipeline snaps the head's samples to one-hot before the decoder renders them."""
    from blip3o.data.processing import to_pixels
    from blip3o.data.world_data import load_split
    from blip3o.eval.model_eval import reconstruction_run
    from blip3o.models.heads import map_to_tokens, snap_layout
    from blip3o.train.recipe import make_task
    from blip3o.world.spec import NUM_CLASS_IDS

    overrides = ["model.generation.target=layout"]
    for part in ("world", "tokenizer", "clip", "vae", "understanding", "scales.safetensors"):
        (tmp_path / part).symlink_to(tiny_run / part)
    cfg = resolve("tiny-debug", overrides)
    dec, gen = make_task("decoder", cfg, tmp_path), make_task("generation", cfg, tmp_path)
    idx = dec.indices(3, 0, 0, 1)
    layout = dec.enc.layout(to_pixels(dec.data.images[idx]))
    assert torch.equal(dec.batch(3, 0, 0, 1)["clip"], map_to_tokens(layout))
    assert torch.equal(gen.batch(3, 0, 0, 1)["x0"], layout)

    run_recipe(resolve("tiny-debug", ["recipe.stages=[decoder,generation]", *overrides]), tmp_path, progress=False)
    pipe = BLIP3oPipeline.from_run(tmp_path)
    seen = []
    decode = pipe.decode_features
    pipe.decode_features = lambda features, *args: seen.append(features) or decode(features, *args)
    images = pipe(["a photo of a star", "a photo of two red circles"], seed=0, num_inference_steps=2)
    side = cfg.model.vision.image_size
    assert len(images) == 2 and images[0].size == (side, side)
    assert torch.equal(seen[0], snap_layout(seen[0], NUM_CLASS_IDS))  # one-hot at ±1, as in training
    assert 0 <= reconstruction_run(pipe, tmp_path / "world", n=2)["decoder"] <= 1
    assert torch.equal(seen[1], dec.enc.layout(to_pixels(load_split(tmp_path / "world", "heldout").images[:2])))
    capsys.readouterr()
    assert main(["eval", "reconstruction", str(tmp_path), "--n", "2"]) == 0
    assert "by the pixel decoder from their layouts" in capsys.readouterr().out


def test_a_discrete_layout_head_trains_on_masked_cells_and_generates(tiny_run, tmp_path):
    """``generation.objective=discrete``: the stage trains the masked head by the masked cells' cross-entropy,
    which falls, plus (with ``prior``) the prior logits' cross-entropy on every cell with its weight; the run
    samples images through the pipeline."""
    from blip3o.diffusion.flow import sample_sigmas
    from blip3o.diffusion.masked import masked_ce
    from blip3o.models.heads import MaskedHead, cell_log_probs, layout_to_ids
    from blip3o.train.recipe import make_task

    overrides = [
        "model.generation.target=layout",
        "model.generation.objective=discrete",
        "model.generation.prior=true",
        "model.generation.prior_weight=0.5",
    ]
    for part in ("world", "tokenizer", "clip", "vae", "understanding", "scales.safetensors"):
        (tmp_path / part).symlink_to(tiny_run / part)
    task = make_task("generation", resolve("tiny-debug", overrides), tmp_path)
    model, batch = task.build_model(), task.batch(1, 0, 0, 1)
    losses = task.loss(model, batch)
    torch.testing.assert_close(losses["loss"], losses["gen"] + 0.5 * losses["prior"])
    ids = layout_to_ids(batch["x0"])
    gen = task.cfg.generation
    g = torch.Generator().manual_seed(batch["seed"])
    sample_sigmas(len(ids), generator=g, mode=gen.timestep_sampling, shift=gen.shift)
    keep = (torch.rand(len(ids), generator=g) >= gen.cond_dropout).float()
    with torch.no_grad():  # the prior's loss reads every cell, masked or not
        cond = model.condition(batch["input_ids"], batch["attention_mask"]) * keep[:, None, None]
        want = masked_ce(cell_log_probs(model.head.prior(cond)), ids, torch.ones_like(ids, dtype=torch.bool))
    torch.testing.assert_close(losses["prior"], want)

    stages = ["recipe.stages=[decoder,generation]", "recipe.generation.steps=40"]
    run_recipe(resolve("tiny-debug", [*stages, *overrides]), tmp_path, progress=False)
    metrics = [json.loads(line) for line in (tmp_path / "generation" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["gen"] for m in metrics if "gen" in m]
    assert np.mean(losses[-5:]) < 0.5 * losses[0] and all("prior" in m for m in metrics if "gen" in m)
    pipe = BLIP3oPipeline.from_run(tmp_path)
    assert isinstance(pipe.model.head, MaskedHead) and pipe.model.head.prior is not None
    images = pipe(["a photo of a star", "a photo of two red circles"], seed=0, num_inference_steps=4)
    assert len(images) == 2 and images[0].size == images[1].size


def test_a_connector_trains_with_the_head_while_the_backbone_stays_bit_identical(tiny_run, tmp_path):
    """``generation.connector_layers``: the generation stage's default trainable paths include the connector,
    which the loss reaches and the stage updates; the understanding weights stay as they were."""
    from blip3o.train.recipe import make_task
    from blip3o.train.trainable import set_trainable

    for part in ("world", "tokenizer", "clip", "vae", "decoder", "understanding", "scales.safetensors"):
        (tmp_path / part).symlink_to(tiny_run / part)
    overrides = ["model.generation.connector_layers=1", "recipe.stages=[generation]"]
    cfg = resolve("tiny-debug", overrides)
    task = make_task("generation", cfg, tmp_path)
    model = task.build_model()
    set_trainable(model, cfg.recipe.generation.trainable, cfg.recipe.generation.frozen)
    task.loss(model, task.batch(1, 0, 0, 1))["loss"].backward()
    grads = [p.grad for p in model.connector.parameters()]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert not any(p.requires_grad for p in model.backbone.parameters())

    run_recipe(cfg, tmp_path, progress=False)
    und = load_file(str(tmp_path / "understanding" / "model.safetensors"))
    gen = load_file(str(tmp_path / "generation" / "model.safetensors"))
    assert all(torch.equal(und[k], gen[k]) for k in und if k.startswith("backbone."))
    start = {f"connector.{k}": v for k, v in model.connector.state_dict().items()}
    assert any(not torch.equal(start[k], gen[k]) for k in start)
    pipe = BLIP3oPipeline.from_run(tmp_path)
    assert pipe.model.connector.num_layers == 1
    assert len(pipe(["a photo of a star"], seed=0, num_inference_steps=2)) == 1


def test_a_discrete_head_with_corruption_also_learns_the_true_ids_of_corrupted_cells(tiny_run, tmp_path):
    """``generation.corruption``: after masking, revealed cells are replaced by random ids with that probability
    (from the same seeded generator), and the loss is the cross-entropy over masked and corrupted cells."""
    from blip3o.diffusion.flow import sample_sigmas
    from blip3o.diffusion.masked import corrupt_cells, mask_cells, masked_ce
    from blip3o.models.heads import LAYOUT_VOCAB, layout_to_ids
    from blip3o.train.recipe import make_task

    for part in ("world", "tokenizer", "clip", "vae", "understanding", "scales.safetensors"):
        (tmp_path / part).symlink_to(tiny_run / part)
    overrides = ["model.generation.target=layout", "model.generation.objective=discrete"]
    task = make_task("generation", resolve("tiny-debug", [*overrides, "model.generation.corruption=0.3"]), tmp_path)
    model, batch = task.build_model().eval(), task.batch(1, 0, 0, 1)
    ids, gen = layout_to_ids(batch["x0"]), task.cfg.generation
    g = torch.Generator().manual_seed(batch["seed"])
    sigma = sample_sigmas(len(ids), generator=g, mode=gen.timestep_sampling, shift=gen.shift)
    keep = (torch.rand(len(ids), generator=g) >= gen.cond_dropout).float()
    x, masked = mask_cells(ids, sigma, LAYOUT_VOCAB, g)
    x, corrupted = corrupt_cells(x, masked, 0.3, LAYOUT_VOCAB, g)
    assert corrupted.any()
    with torch.no_grad():
        logits = model(
            "generate",
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            x=x,
            sigma=sigma,
            keep=keep,
        )
        torch.testing.assert_close(task.loss(model, batch)["gen"], masked_ce(logits, ids, masked | corrupted))
    with pytest.raises(Exception, match="corruption is an option of the discrete head"):
        resolve("tiny-debug", ["model.generation.corruption=0.1"])
