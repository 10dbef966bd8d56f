"""The BLIP3-o pipeline, diffusers-style: ``pipe(prompt, …) → PIL images`` and ``pipe.chat(image, question)``.

Text → image: prompts (left-padded, with the same chat template as in training) → backbone with N
learnable queries → the queries' hidden states condition the generation head, which is sampled with
Euler + CFG (unconditional and conditional branches in one batch) → CLIP map → pixel decoder (SANA
over VAE latents, also Euler + CFG) → VAE decode. With a latent target the head's output goes straight
to the VAE; a discrete layout head is sampled by unmasking its cells (:mod:`blip3o.diffusion.masked`).
Each prompt's noise comes from its own seed, so a batch of prompts gives the same images as the prompts
one at a time.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerBase

from blip3o.config import RunConfig, load_yaml
from blip3o.config.model import ModelConfig
from blip3o.data.processing import chat_inputs, generation_inputs, to_images, to_pixels
from blip3o.data.tokenizer import IM_END_TOKEN, load_tokenizer
from blip3o.diffusion.masked import gumbel, unmask_sample
from blip3o.diffusion.sampler import euler_sample
from blip3o.models.build import Encoders, build_blip3o, load_weights
from blip3o.models.heads import PixelDecoder, SelfConditioned, ids_to_layout, map_to_tokens, snap_layout
from blip3o.models.unified import GENERATION_PARTS, BLIP3o
from blip3o.world.spec import NUM_CLASS_IDS

MODEL_FILE = "model.safetensors"
SCALES_FILE = "scales.safetensors"


def require(path: Path, stage: str) -> Path:
    """``path`` if it exists, else an error naming the training stage that makes it."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the {stage} stage first (`blip3o train`)")
    return path


NOISE_OFFSET = 7919
"""Added to an image's seed for the noise of its second diffusion (the pixel decoder, BLIP3o-NEXT's SANA), so
that it is independent of the first's."""

STEP_NOISE_OFFSET = 104729
"""Added to an image's seed for the fresh noise of a stochastic sampler's steps."""


def noise_stream(shape: Sequence[int], seeds: Sequence[int], draw=torch.randn):
    """A function returning fresh noise (len(seeds), *shape) per call (standard normal, or ``draw``'s, e.g.
    ``torch.rand``), each row drawn in turn from its own generator seeded with its seed, so a batch draws what
    its rows draw alone."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return lambda: torch.stack([draw(tuple(shape), generator=g) for g in gens])


def seeded_uniform(shape: Sequence[int], seeds: Sequence[int]) -> torch.Tensor:
    """One U[0, 1) tensor of ``shape`` per seed, stacked: (len(seeds), *shape)."""
    return noise_stream(shape, seeds, torch.rand)()


def seeded_noise(shape: Sequence[int], seeds: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """One standard-normal tensor of ``shape`` per seed, stacked: (len(seeds), *shape)."""
    return noise_stream(shape, seeds)().to(device)


def load_encoders(run: Path, cfg: ModelConfig, text_vocab_size: int) -> Encoders:
    """The frozen mini-CLIP vision tower and VAE of a run directory, with its measured scales, and its layout
    reader once the reader stage has trained it (``vision.reader_width`` > 0)."""
    reader = run / "reader" / MODEL_FILE
    return Encoders.from_weights(
        cfg,
        text_vocab_size,
        require(run / "clip" / MODEL_FILE, "clip"),
        require(run / "vae" / MODEL_FILE, "vae"),
        load_file(str(require(run / SCALES_FILE, "clip and vae"))),
        reader if cfg.vision.reader_width and reader.is_file() else None,
    )


@torch.no_grad()
def decode_with(
    decoder: PixelDecoder,
    encoders: Encoders,
    cfg: ModelConfig,
    features: torch.Tensor,
    seeds: Sequence[int],
    guidance_scale: float | None = None,
    steps: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Standardised CLIP maps or layouts (B, D, g, g) → pixels (B, 3, H, W): ``decoder`` (Euler + CFG against a
    zero condition, ``cfg.decoder``'s steps and guidance unless given, noise of each seed + ``NOISE_OFFSET``)
    → the VAE of ``encoders``."""
    dec = cfg.decoder
    tokens = map_to_tokens(features)
    latents = euler_sample(
        decoder,
        seeded_noise(cfg.latent_shape, [s + NOISE_OFFSET for s in seeds]),
        tokens,
        uncond=torch.zeros_like(tokens),
        num_steps=steps or dec.steps,
        guidance_scale=dec.guidance_scale if guidance_scale is None else guidance_scale,
        progress=progress,
    )
    return encoders.decode(latents)


def expand_requests(
    prompt: str | Sequence[str], seed: int | Sequence[int], num_images: int
) -> tuple[list[str], list[int]]:
    """One prompt and one seed per image, prompt-major: ``seed`` is one int or one per prompt, and image k
    of a prompt with seed s gets seed s + k."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    seeds = [seed] * len(prompts) if isinstance(seed, int) else list(seed)
    if len(seeds) != len(prompts):
        raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts; give one int or one per prompt")
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    return [p for p in prompts for _ in range(num_images)], [s + k for s in seeds for k in range(num_images)]


class BLIP3oPipeline:
    """Generation and understanding with a trained BLIP3-o model (see the module docstring)."""

    def __init__(
        self,
        cfg: ModelConfig,
        model: BLIP3o,
        tokenizer: PreTrainedTokenizerBase,
        encoders: Encoders,
        decoder: PixelDecoder | None,
        untrained_head: Path | None = None,
    ) -> None:
        """``untrained_head``: the missing generation weights of a run whose generation stage has not
        finished (:meth:`from_run`); such a pipeline can chat but not draw."""
        self.cfg, self.model, self.tokenizer, self.encoders, self.decoder = (
            cfg,
            model.eval(),
            tokenizer,
            encoders,
            decoder,
        )
        self.untrained_head = untrained_head

    @classmethod
    def from_run(cls, run: str | Path) -> BLIP3oPipeline:
        """Load a trained run directory (its generation stage, else its understanding stage)."""
        run = Path(run)
        cfg = load_yaml(require(run / "config.yaml", "any"), RunConfig).model
        tokenizer = load_tokenizer(run / "tokenizer")
        enc = load_encoders(run, cfg, len(tokenizer))
        # The model's tower is its own copy: an understanding stage may have trained it, while the generation
        # target and the pixel decoder's input stay the frozen mini-CLIP's.
        model = build_blip3o(cfg, tokenizer, copy.deepcopy(enc.vision))
        head = run / "generation" / MODEL_FILE
        trained = head.is_file()
        if trained:
            load_weights(model, head)
        else:  # the understanding stage's head and queries are untrained, and may differ from the config's
            load_weights(model, require(run / "understanding" / MODEL_FILE, "understanding"), skip=GENERATION_PARTS)
        decoder = None
        if (run / "decoder" / MODEL_FILE).is_file():
            c, side, _ = cfg.latent_shape
            decoder = PixelDecoder(cfg.decoder, c, side, cfg.decoder_channels)
            load_weights(decoder, run / "decoder" / MODEL_FILE)
        return cls(cfg, model, tokenizer, enc, decoder, untrained_head=None if trained else head)

    SAMPLING = (
        "steps",
        "guidance_scale",
        "eta",
        "temperature",
        "shift",
        "reveal_order",
        "confidence_noise",
        "refine_steps",
        "refine_threshold",
    )
    """The fields of :class:`~blip3o.config.model.GenerationConfig` that sampling reads (``shift`` is also the
    training schedule's; sampling may override it)."""

    def apply_sampling(self, cfg: RunConfig) -> None:
        """Take the sampling settings of ``cfg.model`` (the generation head's :attr:`SAMPLING`; the pixel
        decoder's steps and guidance), e.g. a run config with overrides."""
        gen, dec = cfg.model.generation, cfg.model.decoder
        self.cfg = replace(
            self.cfg,
            generation=replace(self.cfg.generation, **{k: getattr(gen, k) for k in self.SAMPLING}),
            decoder=replace(self.cfg.decoder, steps=dec.steps, guidance_scale=dec.guidance_scale),
        )

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        num_images: int = 1,
        seed: int | Sequence[int] = 0,
        guidance_scale: float | None = None,
        num_inference_steps: int | None = None,
        decoder_guidance_scale: float | None = None,
        decoder_steps: int | None = None,
        progress: bool = False,
    ) -> list[Image.Image]:
        """Images for each prompt (``num_images`` each, prompt-major). ``seed``: one int, or one per prompt;
        image k of a prompt with seed s uses seed s + k."""
        if self.untrained_head is not None:
            raise ValueError(
                f"{self.untrained_head} is missing: this run's generation stage has not finished, so it can chat"
                " but not generate (train it with `blip3o train PRESET --out RUN`)"
            )
        all_prompts, all_seeds = expand_requests(prompt, seed, num_images)
        gen = self.cfg.generation
        ids, mask = generation_inputs(self.tokenizer, all_prompts)
        cond = self.model.condition(ids, mask)  # (B, N, D)
        if gen.objective == "mse":
            target = self.model.regress(cond)
        elif gen.objective == "discrete":
            target = ids_to_layout(self.sample_cells(cond, all_seeds, guidance_scale, num_inference_steps, progress))
        else:
            noise = seeded_noise(self.cfg.target_shape, all_seeds)
            velocity = self.model.velocity
            if gen.self_condition:
                velocity = SelfConditioned(velocity, self.model.head)
            target = euler_sample(
                velocity,
                noise,
                cond,
                uncond=torch.zeros_like(cond),
                num_steps=num_inference_steps or gen.steps,
                guidance_scale=gen.guidance_scale if guidance_scale is None else guidance_scale,
                shift=gen.shift,
                eta=gen.eta,
                step_noise=noise_stream(self.cfg.target_shape, [s + STEP_NOISE_OFFSET for s in all_seeds])
                if gen.eta > 0
                else None,
                progress=progress,
            )
        if gen.target == "latent":
            return to_images(self.encoders.decode(target))
        if gen.target == "layout":
            target = snap_layout(target, NUM_CLASS_IDS)
        return to_images(self.decode_features(target, all_seeds, decoder_guidance_scale, decoder_steps, progress))

    def sample_cells(
        self,
        cond: torch.Tensor,
        seeds: Sequence[int],
        guidance_scale: float | None = None,
        steps: int | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """A discrete head's layout cell ids (B, h, w) for the query states (B, N, D), each image's reveal times
        and Gumbel noise drawn from its own seed (:func:`blip3o.diffusion.masked.unmask_sample`)."""
        gen, head = self.cfg.generation, self.model.head
        _, side, _ = self.cfg.target_shape
        return unmask_sample(
            head,
            seeded_uniform((side, side), seeds),
            gumbel(seeded_uniform((head.vocab, side, side), [s + STEP_NOISE_OFFSET for s in seeds])),
            cond,
            mask_id=head.mask_id,
            uncond=torch.zeros_like(cond),
            num_steps=steps or gen.steps,
            guidance_scale=gen.guidance_scale if guidance_scale is None else guidance_scale,
            temperature=gen.temperature,
            shift=gen.shift,
            order=gen.reveal_order,
            confidence_noise=gen.confidence_noise,
            refine_steps=gen.refine_steps,
            refine_threshold=gen.refine_threshold,
            progress=progress,
        )

    @torch.no_grad()
    def decode_features(
        self,
        features: torch.Tensor,
        seeds: Sequence[int],
        guidance_scale: float | None = None,
        steps: int | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """What the pixel decoder reads (standardised CLIP maps, or layouts for a layout-target model; (B, D, g, g))
        → pixels (B, 3, H, W) through the pixel decoder and the VAE."""
        if self.decoder is None:
            raise ValueError(
                "a CLIP-target model needs a pixel decoder to make pixels; this run has none (train its decoder stage)"
            )
        return decode_with(self.decoder, self.encoders, self.cfg, features, seeds, guidance_scale, steps, progress)

    @torch.no_grad()
    def chat(
        self, image: Image.Image | Sequence[Image.Image], question: str | Sequence[str], max_new_tokens: int = 48
    ) -> str | list[str]:
        """Answer questions about images (greedy, KV-cached ``generate`` of the backbone)."""
        single = isinstance(question, str)
        images = [image] if single else list(image)
        questions = [question] if single else list(question)
        ids, mask = chat_inputs(self.tokenizer, questions, self.cfg.vision.grid**2)
        embeds = self.model.embed(ids, to_pixels(images, self.cfg.vision.image_size))
        end = self.tokenizer.convert_tokens_to_ids(IM_END_TOKEN)
        out = self.model.backbone.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=end,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        answers = [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in out]
        return answers[0] if single else answers
