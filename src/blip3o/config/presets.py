"""Named presets: plain functions returning a full :class:`RunConfig`, registered in :data:`PRESETS`.

Presets build on one another with :func:`dataclasses.replace` (as DiT's ``DiT_models`` dict names its
model functions), so each one states only what it changes. A run is ``--preset NAME`` plus dotted
overrides: :func:`resolve`. Preset names use dashes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from blip3o.config.io import apply_overrides
from blip3o.config.model import BackboneConfig, DiTConfig, VisionConfig
from blip3o.config.next import NextConfig, layout_code_fields, next_3b, shapes_next
from blip3o.config.recipe import BLIP3O_STAGES, NEXT_STAGES, SHARED_STAGES, STAGES
from blip3o.config.schema import ConfigError, RunConfig

__all__ = ["PRESETS", "demo_next", "get_preset", "resolve", "shapes_blip3o", "shapes_demo", "tiny_debug", "with_next"]


def shapes_demo() -> RunConfig:
    """The demo: a 1000-sample world, 120 held-out prompts, 2 images per prompt, a shortened BLIP3-o recipe."""
    base = RunConfig(name="shapes-demo")
    steps = {"clip": 400, "vae": 600, "decoder": 1000, "understanding": 1000, "generation": 1000}
    return replace(
        base,
        world=replace(base.world, n_train=1000, n_heldout=100, n_prompts=120),
        eval=replace(base.eval, images_per_prompt=2),
        recipe=replace(base.recipe, **{k: replace(base.recipe.stage(k), steps=v) for k, v in steps.items()}),
    )


def tiny_debug() -> RunConfig:
    """The smallest useful run, for tests and CPU smoke runs: 32 px images, 64 samples, a few steps per stage."""
    base = shapes_demo()
    tiny_steps = {
        name: replace(
            base.recipe.stage(name),
            steps=4,
            batch_size=8,
            log_every=2,
            ckpt_every=2,
            optim=replace(base.recipe.stage(name).optim, warmup_steps=0),
        )
        for name in STAGES
    }
    return replace(
        base,
        name="tiny-debug",
        world=replace(base.world, size=32, n_train=64, n_heldout=16, n_prompts=24, shard_size=32),
        eval=replace(base.eval, images_per_prompt=1, n_prompts=12),
        model=replace(base.model, vision=replace(base.model.vision, image_size=32, patch_size=4)),
        recipe=replace(base.recipe, vocab_size=512, **tiny_steps),
    )


def shapes_blip3o() -> RunConfig:
    """The default BLIP3-o shapes recipe: CLIP + flow matching, sequential training, all five stages.

    20,000 training scenes: with 4,000 a tiny ViT overfits before it tells shapes apart (a supervised
    probe on held-out images: 0.85 class-presence accuracy after 3,000 steps, against 0.94 with 20,000).
    The generation target is the unpooled 8×8 CLIP map with 64 queries, as in the official model (an
    8×8 map): from the 4×4 pooled map the pixel decoder kept 0.11 of held-out images correct, from
    the 8×8 map 0.45. The mini-CLIP's vision tower has 4 layers: a linear probe names the class under
    an object's centre 0.89 of the time from its patch map with the per-patch grounding loss (0.71
    with a grounded-caption loss on the 3×3 places instead; 0.64 with that and 2 layers). The pixel
    decoder samples with CFG 3 (0.43 of held-out images reconstructed correctly, against 0.37 at 1.5)
    and is 128 wide: 0.685 of 200 held-out images come back correct from their real maps, against
    0.42–0.43 at width 64 with the same 1,500 steps.
    """
    base = RunConfig(name="shapes-blip3o")
    model = base.model
    return replace(
        base,
        world=replace(base.world, n_train=20000, n_heldout=400, n_prompts=120),
        eval=replace(base.eval, images_per_prompt=2),
        model=replace(
            model,
            vision=replace(model.vision, pool=1, num_layers=4),
            generation=replace(model.generation, num_queries=64),
            decoder=replace(model.decoder, guidance_scale=3.0, dit=replace(model.decoder.dit, hidden_size=128)),
        ),
        recipe=replace(base.recipe, clip=replace(base.recipe.clip, steps=3000)),
    )


def _variant(name: str, **generation: object) -> Callable[[], RunConfig]:
    def build() -> RunConfig:
        base = shapes_blip3o()
        return replace(
            base, name=name, model=replace(base.model, generation=replace(base.model.generation, **generation))
        )

    build.__doc__ = f"The shapes recipe with generation {generation} (the paper's ablation)."
    return build


def shapes_blip3o_layout() -> RunConfig:
    """The shapes recipe generating the mini-CLIP's grounded 16×16 layout with a discrete (masked) head.

    The head writes which class in which colour covers each 4-pixel cell, as the mini-CLIP's grounding head
    (two cells a patch side) reads real images, and the pixel decoder renders that reading: the highest
    GenEval-shapes measured on this world (docs/blip3o.md, "A discrete head for the layout"). The head is
    4 layers × 128 wide with the per-cell prior, and samples 60 unmasking steps on a σ schedule shifted by 3,
    which reveals few cells while the map is still empty, then redraws in four corrector rounds the cells it
    finds under 0.3 likely given the finished map (the specks and extra objects of cells revealed early).
    The layout is read by a convolutional reader on the frozen mini-CLIP (the ``reader`` stage, 128 wide),
    which names the class of 0.91 of held-out object cells where the tower's linear head names 0.73.
    The pixel decoder is 4 layers deep: drawing 200 held-out scenes from their readings it keeps 0.84 of them
    correct where 2 layers keep 0.69 (stars, circles and hexagons drawn as blobs; the VAE alone keeps 0.915),
    docs/next.md "A 4-layer pixel decoder".
    """
    base = shapes_blip3o()
    model = base.model
    model = replace(model, decoder=replace(model.decoder, dit=replace(model.decoder.dit, num_layers=4)))
    gen = replace(
        model.generation,
        target="layout",
        objective="discrete",
        prior=True,
        shift=3.0,
        steps=60,
        refine_steps=4,
        refine_threshold=0.3,
        dit=replace(model.generation.dit, num_layers=4, hidden_size=128),
    )
    return replace(
        base,
        name="shapes-blip3o-layout",
        model=replace(model, vision=replace(model.vision, grounding_cells=2, reader_width=128), generation=gen),
        recipe=replace(base.recipe, stages=[*SHARED_STAGES, *BLIP3O_STAGES[3:]]),
    )


def shapes_blip3o_joint() -> RunConfig:
    """The shapes recipe with joint training: backbone trainable, understanding batches mixed into generation."""
    base = shapes_blip3o()
    gen = replace(base.recipe.generation, trainable=["backbone", "projector", "queries", "connector", "head"])
    return replace(base, name="shapes-blip3o-joint", recipe=replace(base.recipe, training="joint", generation=gen))


def _full_size(name: str, backbone: BackboneConfig) -> RunConfig:
    """Official BLIP3-o shapes: 64 queries; a 24-layer, 1792-wide, 28-head Lumina-Next DiT over the pooled
    8×8×1792 CLIP map of 448 px images (EVA-CLIP-E-14-plus widths, patch 14 → 32×32 → pool 4)."""
    base = shapes_blip3o()
    vision = VisionConfig(
        image_size=448,
        patch_size=14,
        hidden_size=1792,
        num_layers=64,
        num_heads=16,
        intermediate_size=15360,
        text_layers=2,
        pool=4,
    )
    dit = DiTConfig(hidden_size=1792, num_layers=24, num_heads=28, multiple_of=256, ffn_multiplier=1.5)
    model = replace(
        base.model,
        backbone=backbone,
        vision=vision,
        vocab_size=152064,
        generation=replace(base.model.generation, num_queries=64, dit=dit),
    )
    return replace(base, name=name, world=replace(base.world, size=448), model=model)


def blip3o_8b() -> RunConfig:
    """BLIP3o-8B shapes: the Qwen2.5-VL-7B text decoder (3584 wide), 64 queries, the 1.7B-class Lumina-Next DiT."""
    return _full_size(
        "blip3o-8b",
        BackboneConfig(
            kind="qwen2",
            tie_embeddings=False,
            hidden_size=3584,
            num_layers=28,
            num_heads=28,
            num_kv_heads=4,
            head_dim=128,
            intermediate_size=18944,
            max_positions=32768,
            rope_theta=1e6,
        ),
    )


def blip3o_4b() -> RunConfig:
    """BLIP3o-4B shapes: the Qwen2.5-VL-3B text decoder (2048 wide), 64 queries, the same DiT as the 8B."""
    return _full_size(
        "blip3o-4b",
        BackboneConfig(
            kind="qwen2",
            tie_embeddings=True,
            hidden_size=2048,
            num_layers=36,
            num_heads=16,
            num_kv_heads=2,
            head_dim=128,
            intermediate_size=11008,
            max_positions=32768,
            rope_theta=1e6,
        ),
    )


def next_for(cfg: RunConfig, base: NextConfig) -> NextConfig:
    """``base`` wired to the shared parts of ``cfg``: the codes cover the mini-CLIP's generation map (or, for
    layout codes, each cell of its grounded reading), the connector writes what the pixel decoder reads, and
    SANA is the pixel decoder (same DiT, latents and spatial input)."""
    model = cfg.model
    c, side, _ = model.latent_shape
    codes = {"image_tokens": model.vision.target_grid**2, "connector_dim": model.decoder_channels}
    if base.image_codes == "layout":
        codes = layout_code_fields(model, base.layout_pool)
    return replace(
        base,
        **codes,
        text_vocab_size=cfg.recipe.vocab_size,
        sana=model.decoder.dit,
        spatial=model.decoder.spatial,
        latent_channels=c,
        latent_side=side,
    )


def with_next(cfg: RunConfig, base: NextConfig, name: str, steps: Mapping[str, int] | None = None) -> RunConfig:
    """``cfg`` (a BLIP3-o shapes config) with the BLIP3o-NEXT model ``base`` on its shared parts
    (:func:`next_for`) and the recipe ``clip → vae → decoder → image_tokenizer → next → instruct``
    (the next and instruct stages train the backbone, the connector and ``next.train_sana``, see
    :func:`blip3o.train.recipe.stage_config`). ``steps`` overrides stage lengths."""
    stages = {k: replace(cfg.recipe.stage(k), steps=v) for k, v in (steps or {}).items()}
    own = [s for s in NEXT_STAGES if s != "image_tokenizer" or base.image_codes == "vq"]
    shared = [s for s in SHARED_STAGES if s != "reader" or cfg.model.vision.reader_width]
    recipe = replace(cfg.recipe, stages=[*shared, *own], **stages)
    return replace(cfg, name=name, next=next_for(cfg, base), recipe=recipe)


def shapes_next_model() -> NextConfig:
    """The shapes BLIP3o-NEXT model: a 128-wide, 4-layer Qwen3 (the BLIP3-o shapes backbone is 64 × 2: writing
    64 codes that place objects is harder than answering about them), 1024 codes; SANA keeps its input
    projection trainable besides the caption projection and norm, because the reference-latent
    channels of editing enter there."""
    backbone = BackboneConfig(
        hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32, intermediate_size=384
    )
    return replace(
        shapes_next(),
        backbone=backbone,
        train_sana=["caption_projection", "caption_norm", "patch_embed"],
        top_k=20,  # the official 1200 of 65,536 codes is 1.8% of the codebook; 20 of 1024 is 2%
    )


def shapes_next_run() -> RunConfig:
    """The default BLIP3o-NEXT shapes recipe: the BLIP3-o run's world, mini-CLIP, VAE and pixel decoder, then
    the image tokenizer (1024 codes over the 8×8 CLIP map: 64 tokens per image), NEXT pre-training on
    captions, edits and image → text, and instruction tuning on a tag-balanced set."""
    return with_next(shapes_blip3o(), shapes_next_model(), "shapes-next")


def shapes_next_layout() -> RunConfig:
    """BLIP3o-NEXT over layout codes: the backbone writes the mini-CLIP's grounded reading (which class in which
    colour; 61 ids), one code for each 2×2 block of its 16×16 cells (``next.layout_pool=2``: 64 tokens an
    image, an object 2–3 codes a side), and their hidden states condition the layout pixel decoder of
    ``shapes-blip3o-layout``, whose clip, vae, reader and decoder stages it shares (``--reuse``). Sampling:
    top-p 0.95 over all 61 ids and CFG 1.5 on the token logits (GenEval-shapes 0.270 against 0.195 without
    it, docs/next.md "Layout codes"). Against one code a cell on the same shared stages,
    the pooled codes write better layouts (0.652 against 0.465), keep far more of what an edit leaves alone
    (consistency 0.76 against 0.42) and train in 50 minutes instead of 70 (docs/next.md "Pooled layout
    codes"). Edits blend with the reference and sample under a copy prior of 3 (``next.edit_blend``,
    ``next.copy_bias``). A code upsampler (``next.upsample_codes``) gives SANA back the 16×16 reading the
    4-layer pixel decoder was trained to draw from. The schedule is 1,000 ``next`` and 1,800 ``instruct`` steps
    (the colour a prompt asks for is learnt late, docs/next.md "Colours are learnt late"), with half of each
    kind of image row taking the flow loss (``next.flow_fraction``), which makes a step 1.3× cheaper:
    docs/next.md "Half the rows through SANA" has GenEval-shapes and edits against every row and against
    500 + 1,100 steps."""
    base = replace(
        shapes_next_model(), image_codes="layout", layout_pool=2, top_k=None, ar_guidance_scale=1.5, edit_fraction=0.4
    )
    # Edits keep the reference where the written codes copy it, and lean towards copying it: on 64 block codes
    # a copy prior of 3 keeps what the instruction leaves alone at 0.96 for 0.62 of the asked changes (0.76 and
    # 0.65 without it), docs/next.md "Pooled layout codes".
    base = replace(base, edit_blend=True, copy_bias=3.0)
    base = replace(base, backbone=replace(base.backbone, max_positions=1024), flow_fraction=0.5)
    cfg = with_next(shapes_blip3o_layout(), base, "shapes-next-layout", {"next": 1000, "instruct": 1800})
    # Instruction tuning trains SANA whole: its edit rows need more than the caption projection to draw a change.
    instruct = replace(cfg.recipe.instruct, trainable=["backbone", "connector", "dit"])
    nxt = replace(cfg.next, upsample_codes=True)  # after with_next, which gives SANA the decoder's spatial input
    return replace(cfg, next=nxt, recipe=replace(cfg.recipe, instruct=instruct))


def tiny_next() -> RunConfig:
    """The tiny-debug world and shared parts with a tiny BLIP3o-NEXT on top (tests, smoke runs)."""
    base = replace(shapes_next(), codebook_size=64, train_sana=["caption_projection", "caption_norm", "patch_embed"])
    return with_next(tiny_debug(), base, "tiny-next")


DEMO_NEXT_STEPS = {"image_tokenizer": 200, "next": 250, "instruct": 50}
"""Upper bounds on the NEXT stage lengths in the demo (which must finish in under 15 minutes cold)."""


def demo_next(cfg: RunConfig) -> RunConfig:
    """The BLIP3o-NEXT run the demo trains on top of its BLIP3-o config ``cfg`` (stages capped by
    :data:`DEMO_NEXT_STEPS`)."""
    steps = {k: min(v, cfg.recipe.stage(k).steps) for k, v in DEMO_NEXT_STEPS.items()}
    return with_next(cfg, shapes_next_model(), f"{cfg.name}-next", steps)


def demo_grpo(next_cfg: RunConfig) -> RunConfig:
    """The GRPO run the demo makes from its BLIP3o-NEXT run: the ``shapes-geneval`` settings, shortened."""
    from blip3o.config.grpo import shapes_geneval

    short = {"steps": 12, "prompts_per_step": 4, "rollout_steps": 10, "sample_every": 0, "ckpt_every": 12}
    return replace(next_cfg, grpo=replace(shapes_geneval(), **short))


def blip3o_next_3b() -> RunConfig:
    """BLIP3o-NEXT-3B shapes (:func:`blip3o.config.next.next_3b`), for meta-device checks and checkpoints."""
    base = RunConfig(name="blip3o-next-3b")
    return replace(base, next=next_3b())


def _stage_preset(stage: str) -> Callable[[], RunConfig]:
    def build() -> RunConfig:
        base = shapes_blip3o()
        return replace(base, name=f"shapes-blip3o-{stage}", recipe=replace(base.recipe, stages=[stage]))

    build.__doc__ = f"Only the {stage} stage of the shapes recipe (earlier stages must be in the run directory)."
    return build


PRESETS: dict[str, Callable[[], RunConfig]] = {
    "shapes-demo": shapes_demo,
    "tiny-debug": tiny_debug,
    "shapes-blip3o": shapes_blip3o,
    "shapes-blip3o-mse": _variant("shapes-blip3o-mse", objective="mse"),
    "shapes-blip3o-latent": _variant("shapes-blip3o-latent", target="latent"),
    "shapes-blip3o-joint": shapes_blip3o_joint,
    "shapes-blip3o-layout": shapes_blip3o_layout,
    **{f"shapes-blip3o-{stage}": _stage_preset(stage) for stage in BLIP3O_STAGES},
    "shapes-next": shapes_next_run,
    "shapes-next-layout": shapes_next_layout,
    "tiny-next": tiny_next,
    "blip3o-next-3b": blip3o_next_3b,
    "blip3o-8b": blip3o_8b,
    "blip3o-4b": blip3o_4b,
}
"""Preset name -> function building a fresh :class:`RunConfig` (a new object on every call)."""


def get_preset(name: str) -> RunConfig:
    """A fresh config for preset ``name``; an unknown name raises ConfigError listing the valid ones."""
    try:
        build = PRESETS[name]
    except KeyError:
        valid = ", ".join(sorted(PRESETS))
        hint = ""
        if isinstance(name, str) and name.replace("_", "-") in PRESETS:
            hint = f" (did you mean {name.replace('_', '-')!r}?)"
        raise ConfigError(f"unknown preset {name!r}{hint}; valid presets: {valid}") from None
    return build()


def resolve(name: str, overrides: Sequence[str] = ()) -> RunConfig:
    """Preset ``name`` with ``dotted.key=value`` overrides applied and the result validated."""
    return apply_overrides(get_preset(name), overrides)
