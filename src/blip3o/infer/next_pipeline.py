"""The BLIP3o-NEXT pipeline: ``pipe(prompt, …)``, ``pipe.edit(image, instruction, …)``, ``pipe.chat(image, question)``.

Text → image: the prompt (left-padded, ending ``<im_start> <S0>``) → KV-cached AR sampling of exactly N
image codes (:func:`blip3o.infer.ar_sampling.sample_image_tokens`: top-k/top-p/temperature, optional
CFG on logits, per-row seeds), which also returns the hidden states of ``<S0>`` and the codes → connector →
SANA over VAE latents, Euler + CFG with the unconditional and conditional branches in one batch → VAE
decode. Editing is the same with the reference image's codes in the prompt and its VAE latents as
SANA's reference channels; with ``next.edit_blend`` the latents under codes the model copied from the
reference follow the reference's own noise path (:func:`blend_velocity`), and the decoded image takes the
reference's own pixels there (:func:`paste_kept`), so what the edit leaves alone does not pass through the VAE.
Each image's token draws and noise come from its own seed, so a batch of prompts gives the same images as
the prompts one at a time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import PreTrainedTokenizerBase

from blip3o.config import RunConfig, load_yaml
from blip3o.config.next import NextConfig
from blip3o.data.next_inputs import image_prompts, text_rows
from blip3o.data.processing import to_images, to_pixels
from blip3o.data.tokenizer import IM_END_TOKEN, load_tokenizer
from blip3o.diffusion.sampler import euler_sample
from blip3o.infer.ar_sampling import ARSample, sample_image_tokens
from blip3o.infer.pipeline import MODEL_FILE, NOISE_OFFSET, expand_requests, load_encoders, require, seeded_noise
from blip3o.models.build import Encoders, load_weights
from blip3o.models.image_tokenizer import ImageTokenizer, LayoutTokenizer
from blip3o.models.next import BLIP3oNext, add_image_vocabulary
from blip3o.train.next_tasks import image_codes, image_tokenizer_weights, load_image_tokenizer

NEXT_WEIGHTS = ("next", "instruct", "grpo")
"""The stages whose weights are a whole BLIP3o-NEXT model, in training order."""


def kept_mask(codes: torch.Tensor, reference: torch.Tensor, latent_side: int, margin: int) -> torch.Tensor:
    """(B, N) written and reference codes of an N = g×g map → (B, 1, s, s) float mask on the latent grid:
    1 where the code, and every code within ``margin`` codes of it, equals the reference's."""
    b, n = codes.shape
    g = math.isqrt(n)
    if g * g != n or latent_side % g:
        raise ValueError(
            f"edit_blend needs a square code map dividing the latent side; got {n} codes, side {latent_side}"
        )
    changed = (codes != reference).float().view(b, 1, g, g)
    changed = F.max_pool2d(changed, 2 * margin + 1, stride=1, padding=margin)
    return 1.0 - F.interpolate(changed, scale_factor=latent_side // g, mode="nearest")


def blend_velocity(velocity, reference: torch.Tensor, keep: torch.Tensor):
    """Wrap a velocity function so that, where ``keep`` is 1, it returns (x − reference)/σ: the velocity of
    the straight path from x to the reference. Started from noise ε (or a noised reference), an Euler step
    with it lands exactly on (1 − σ')·reference + σ'·ε, so the sample ends equal to the reference there;
    elsewhere the model's velocity draws the change, seeing the kept context at every step."""

    def blended(x: torch.Tensor, sigma: torch.Tensor, cond) -> torch.Tensor:
        b = x.shape[0] // reference.shape[0]  # the CFG batch holds the rows twice
        ref, k = reference.repeat(b, 1, 1, 1), keep.repeat(b, 1, 1, 1)
        towards = (x - ref) / sigma.clamp_min(1e-6).view(-1, 1, 1, 1)
        return k * towards + (1 - k) * velocity(x, sigma, cond)

    return blended


def paste_kept(images: torch.Tensor, reference: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Decoded images (B, 3, H, W) with the reference's pixels where ``keep`` (B, 1, s, s), upsampled to the
    pixel grid, is 1."""
    keep = F.interpolate(keep, size=images.shape[-2:], mode="nearest")
    return keep * reference + (1 - keep) * images


def last_stage(run: Path) -> str:
    """The last of :data:`NEXT_WEIGHTS` that ``run`` has weights for (``next`` when none)."""
    return next((s for s in reversed(NEXT_WEIGHTS) if (run / s / MODEL_FILE).is_file()), "next")


class NextPipeline:
    """Generation, editing and understanding with a trained BLIP3o-NEXT run (see the module docstring)."""

    def __init__(
        self,
        cfg: RunConfig,
        model: BLIP3oNext,
        tokenizer: PreTrainedTokenizerBase,
        image_tokenizer: ImageTokenizer | LayoutTokenizer,
        encoders: Encoders,
    ) -> None:
        if cfg.next is None:
            raise ValueError("a NextPipeline needs a config with a next section")
        self.cfg, self.next = cfg, cfg.next
        self.model, self.tokenizer = model.eval(), tokenizer
        self.image_tokenizer, self.encoders = image_tokenizer.eval(), encoders

    @classmethod
    def from_run(cls, run: str | Path, stage: str | None = None) -> NextPipeline:
        """Load a trained run directory: its ``stage`` (``next``, ``instruct`` or ``grpo``), by default the last
        one trained."""
        run = Path(run)
        cfg = load_yaml(require(run / "config.yaml", "any"), RunConfig)
        if cfg.next is None:
            raise ValueError(f"{run} is not a BLIP3o-NEXT run (its config has no next section)")
        tokenizer = load_tokenizer(run / "tokenizer")
        text_vocab = len(tokenizer)
        vocab = add_image_vocabulary(tokenizer, cfg.next.codebook_size, cfg.next.num_scales)
        enc = load_encoders(run, cfg.model, text_vocab)
        image_tokenizer = load_image_tokenizer(cfg.next, cfg.model, image_tokenizer_weights(cfg.next, run))
        model = BLIP3oNext.from_config(cfg.next, vocab)
        stage = last_stage(run) if stage is None else stage
        if stage not in NEXT_WEIGHTS:
            raise ValueError(f"a BLIP3o-NEXT model comes from stage {', '.join(NEXT_WEIGHTS)}, not {stage!r}")
        load_weights(model, require(run / stage / MODEL_FILE, stage))
        return cls(cfg, model, tokenizer, image_tokenizer, enc)

    SAMPLING = (
        "temperature",
        "top_k",
        "top_p",
        "ar_guidance_scale",
        "steps",
        "guidance_scale",
        "edit_strength",
        "edit_blend",
        "edit_blend_margin",
        "copy_bias",
    )
    """The fields of :class:`~blip3o.config.next.NextConfig` that only sampling reads."""

    def apply_sampling(self, cfg: RunConfig) -> None:
        """Take the sampling settings (:attr:`SAMPLING`) of ``cfg.next``, e.g. a run config with overrides."""
        if cfg.next is not None:
            self.next = replace(self.next, **{k: getattr(cfg.next, k) for k in self.SAMPLING})

    @torch.no_grad()
    def codes(self, images: Sequence[Image.Image] | torch.Tensor) -> torch.Tensor:
        """Image codes (B, N) of PIL images (or pixels (B, 3, H, W) in [-1, 1])."""
        pixels = images if isinstance(images, torch.Tensor) else to_pixels(images, self.cfg.model.vision.image_size)
        return image_codes(self.encoders, self.image_tokenizer, pixels)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        num_images: int = 1,
        seed: int | Sequence[int] = 0,
        guidance_scale: float | None = None,
        num_inference_steps: int | None = None,
        temperature: float | None = None,
        top_k: int | None = -1,
        top_p: float | None = None,
        ar_guidance_scale: float | None = None,
        progress: bool = False,
    ) -> list[Image.Image]:
        """Images for each prompt (``num_images`` each, prompt-major); ``seed`` one int or one per prompt,
        image k of a prompt with seed s uses seed s + k. Sampling settings default to the config's
        (``top_k=-1`` means the config's; ``None`` keeps every code)."""
        prompts, seeds = expand_requests(prompt, seed, num_images)
        settings = self._settings(guidance_scale, num_inference_steps, temperature, top_k, top_p, ar_guidance_scale)
        return self._images(prompts, seeds, settings, progress=progress)

    @torch.no_grad()
    def edit(
        self,
        image: Image.Image | Sequence[Image.Image],
        instruction: str | Sequence[str],
        num_images: int = 1,
        seed: int | Sequence[int] = 0,
        guidance_scale: float | None = None,
        num_inference_steps: int | None = None,
        temperature: float | None = None,
        top_k: int | None = -1,
        top_p: float | None = None,
        ar_guidance_scale: float | None = None,
        progress: bool = False,
    ) -> list[Image.Image]:
        """Edited images: one image and instruction, or one instruction per image (same conventions as
        :meth:`__call__`)."""
        images = [image] if isinstance(image, Image.Image) else list(image)
        instructions = [instruction] * len(images) if isinstance(instruction, str) else list(instruction)
        if len(instructions) != len(images):
            raise ValueError(f"got {len(instructions)} instructions for {len(images)} images")
        prompts, seeds = expand_requests(instructions, seed, num_images)
        pixels = to_pixels(images, self.cfg.model.vision.image_size).repeat_interleave(num_images, dim=0)
        settings = self._settings(guidance_scale, num_inference_steps, temperature, top_k, top_p, ar_guidance_scale)
        return self._images(prompts, seeds, settings, pixels, progress)

    def _settings(
        self,
        guidance_scale: float | None,
        steps: int | None,
        temperature: float | None,
        top_k: int | None,
        top_p: float | None,
        ar_guidance_scale: float | None,
    ) -> NextConfig:
        """The config's sampling settings with the given ones in their place (``None`` keeps the config's,
        except for ``top_k``, where ``-1`` does and ``None`` keeps every code)."""
        given = {
            "guidance_scale": guidance_scale,
            "steps": steps,
            "temperature": temperature,
            "top_p": top_p,
            "ar_guidance_scale": ar_guidance_scale,
        }
        changes = {k: v for k, v in given.items() if v is not None}
        if top_k != -1:
            changes["top_k"] = top_k
        return replace(self.next, **changes)

    def _images(
        self,
        prompts: list[str],
        seeds: list[int],
        cfg: NextConfig,
        reference: torch.Tensor | None = None,
        progress: bool = False,
    ) -> list[Image.Image]:
        """Images for prompts, or with ``reference`` pixels (B, 3, H, W) in [-1, 1], edits of them."""
        codes = None if reference is None else self.codes(reference)
        refs = None if codes is None else codes.tolist()
        ids, mask = image_prompts(self.tokenizer, self.model.vocab, prompts, refs)
        sample = self.sample_tokens(ids, mask, seeds, cfg, refs)
        written = self.model.vocab.ids_to_codes(sample.tokens)
        if reference is None:
            return to_images(self.render(sample.hidden, seeds, cfg, progress=progress, codes=written))
        latents, keep = self.encoders.latents(reference), None
        if cfg.edit_blend:
            keep = kept_mask(written, codes, cfg.latent_side, cfg.edit_blend_margin)
        images = self.render(sample.hidden, seeds, cfg, latents, progress, keep, written)
        return to_images(images if keep is None else paste_kept(images, reference, keep))

    def sample_tokens(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        seeds: list[int],
        cfg: NextConfig,
        references: list[list[int]] | None = None,
    ) -> ARSample:
        """Image codes and conditioning hidden states for left-padded image prompts (``<S0>`` + N codes)."""
        extra = {}
        if references is not None and cfg.copy_bias:
            codes = torch.tensor(references, device=input_ids.device)
            extra = {"copy_ids": self.model.vocab.codes_to_ids(codes), "copy_bias": cfg.copy_bias}
        if cfg.ar_guidance_scale != 1.0:
            u_ids, u_mask = image_prompts(self.tokenizer, self.model.vocab, [""] * len(seeds), references)
            extra |= {
                "uncond_input_ids": u_ids,
                "uncond_attention_mask": u_mask,
                "guidance_scale": cfg.ar_guidance_scale,
            }
        return sample_image_tokens(
            self.model.backbone,
            input_ids,
            attention_mask,
            cfg.image_tokens,
            self.model.vocab.code_range,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            seeds=seeds,
            prompt_hidden=1,  # <S0>
            **extra,
        )

    def render(
        self,
        hidden: torch.Tensor,
        seeds: list[int],
        cfg: NextConfig,
        reference_latents: torch.Tensor | None = None,
        progress: bool = False,
        keep: torch.Tensor | None = None,
        codes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Pixels (B, 3, H, W) in [-1, 1] from the conditioning hidden states (B, 1 + N, H): connector → SANA
        (Euler + CFG) → VAE. ``keep`` (B, 1, s, s): where the latents follow the reference's
        (:func:`blend_velocity`). ``codes`` (B, N): the written codes, which a model with a code upsampler
        turns into SANA's spatial input (zeros in the unconditional branch)."""
        cond = self.model.connector(hidden)  # (B, 1 + N, C)
        null = self.model.null_condition(len(seeds), cfg.image_tokens)
        spatial = null_spatial = None
        if self.model.upsampler is not None:
            if codes is None:
                raise ValueError("this model draws from the reading upsampled from its codes: pass the written codes")
            spatial = self.model.upsampler.layout(codes)
            null_spatial = torch.zeros_like(spatial)
        ref = reference_latents if cfg.reference_latents else None
        noise = seeded_noise(cfg.latent_shape, [s + NOISE_OFFSET for s in seeds])
        start = 1.0
        if reference_latents is not None and cfg.edit_strength < 1.0:  # SDEdit from the noised reference
            start = cfg.edit_strength
            noise = (1.0 - start) * reference_latents + start * noise
        velocity = lambda x, sigma, c: self.model.velocity(x, sigma, c[0], reference=c[1], spatial=c[2])  # noqa: E731
        if keep is not None:
            velocity = blend_velocity(velocity, reference_latents, keep)
        latents = euler_sample(
            velocity,
            noise,
            (cond, ref, spatial),
            uncond=(null, ref, null_spatial),
            num_steps=cfg.steps,
            guidance_scale=cfg.guidance_scale,
            start=start,
            progress=progress,
        )
        return self.encoders.decode(latents)

    @torch.no_grad()
    def chat(
        self, image: Image.Image | Sequence[Image.Image], question: str | Sequence[str], max_new_tokens: int = 48
    ) -> str | list[str]:
        """Answer questions about images, read as image codes (greedy, KV-cached ``generate``)."""
        single = isinstance(question, str)
        images = [image] if single else list(image)
        questions = [question] if single else list(question)
        rows = text_rows(self.tokenizer, self.model.vocab, self.codes(images), questions)
        out = self.model.backbone.generate(
            input_ids=rows["input_ids"],
            attention_mask=rows["attention_mask"],
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=self.tokenizer.convert_tokens_to_ids(IM_END_TOKEN),
            pad_token_id=self.tokenizer.pad_token_id,
        )
        new = out[:, rows["input_ids"].shape[1] :]
        answers = [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]
        return answers[0] if single else answers


def load_pipeline(run: str | Path, stage: str | None = None):
    """The pipeline a run's config calls for: :class:`NextPipeline` for BLIP3o-NEXT, else BLIP3oPipeline.
    ``stage`` picks a NEXT run's ``next`` or ``instruct`` weights (default: the last trained)."""
    from blip3o.infer.pipeline import BLIP3oPipeline

    cfg = load_yaml(require(Path(run) / "config.yaml", "any"), RunConfig)
    if cfg.next is not None:
        return NextPipeline.from_run(run, stage)
    if stage is not None:
        raise ValueError(f"--stage picks the weights of a BLIP3o-NEXT run; {run} is a BLIP3-o run")
    return BLIP3oPipeline.from_run(run)
