"""The ``blip3o`` command line: parse arguments, call the library, print results. No logic lives here.

Every ``blip3o eval …`` command ends its output with one line of JSON holding its summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from blip3o.config import PRESETS, ConfigError, apply_overrides, dumps_yaml, resolve

log = logging.getLogger("blip3o")


def _overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. world.size=128")


def _stage_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--stage",
        choices=["next", "instruct", "grpo"],
        help="BLIP3o-NEXT runs: the weights of this stage (default: the last trained)",
    )


def _world_make(args: argparse.Namespace) -> int:
    from blip3o.world.shards import make_world

    cfg = resolve(args.preset, args.overrides)
    flags = {"n_train": args.n, "n_heldout": args.heldout, "seed": args.seed, "size": args.size}
    cfg = apply_overrides(cfg, [f"world.{k}={v}" for k, v in flags.items() if v is not None])
    summary = make_world(cfg.world, args.out)
    print(
        f"wrote {summary['samples']['train']} training and {summary['samples']['heldout']} held-out samples, "
        f"{summary['prompts']} held-out prompts to {args.out}"
    )
    return 0


def _world_oracle(args: argparse.Namespace) -> int:
    from blip3o.eval.geneval import oracle_generator, write_layout

    records = [json.loads(line) for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    write_layout(records, args.n, oracle_generator(args.size, args.seed), args.out)
    print(f"wrote {len(records) * args.n} ground-truth images for {len(records)} prompts to {args.out}")
    return 0


def _world_tokenizer(args: argparse.Namespace) -> int:
    from blip3o.data.tokenizer import save_tokenizer, train_bpe_tokenizer
    from blip3o.world.corpus import world_texts

    tok = train_bpe_tokenizer(world_texts(args.world), vocab_size=args.vocab_size)
    save_tokenizer(tok, args.out)
    print(f"trained a {len(tok)}-token BPE tokenizer on {args.world}, saved to {args.out}")
    return 0


def _is_run(path: str) -> bool:
    return (Path(path) / "config.yaml").is_file() and (Path(path) / "world").is_dir()


def _sampling_pipeline(run: Path, stage: str | None, overrides: Sequence[str]):
    """(config with ``overrides``, the run's pipeline with those sampling settings: steps, guidance, top-k …)."""
    from blip3o.config import RunConfig, load_yaml
    from blip3o.infer.next_pipeline import load_pipeline

    cfg = apply_overrides(load_yaml(run / "config.yaml", RunConfig), overrides)
    pipe = load_pipeline(run, stage)
    pipe.apply_sampling(cfg)
    return cfg, pipe


def _eval_geneval(args: argparse.Namespace) -> int:
    from blip3o.eval.geneval import GenEvalScorer, evaluate_folder, format_table, write_results

    if _is_run(args.imagedir):  # a trained run: sample its world's held-out prompts, then score
        from blip3o.eval.model_eval import geneval_run

        run = Path(args.imagedir)
        cfg, pipe = _sampling_pipeline(run, args.stage, args.overrides)
        out = Path(args.out) if args.out else run / "eval" / "geneval"
        summary = geneval_run(pipe, run / "world", cfg.eval, out)
        print(format_table(summary))
        print(f"images and results: {out}")
        print(json.dumps(summary))
        return 0
    scorer = GenEvalScorer(threshold=args.threshold, counting_threshold=args.counting_threshold)
    results, summary = evaluate_folder(args.imagedir, scorer)
    out = Path(args.out) if args.out else Path(args.imagedir) / "geneval_results.jsonl"
    summary_path = write_results(results, summary, out)
    print(format_table(summary))
    print(f"results: {out}\nsummary: {summary_path}")
    print(json.dumps(summary))
    return 0


def _eval_vqa(args: argparse.Namespace) -> int:
    from blip3o.eval.model_eval import vqa_run
    from blip3o.infer.next_pipeline import load_pipeline

    summary = vqa_run(load_pipeline(args.run), Path(args.run) / "world", split=args.split, limit=args.limit)
    for qtype, acc in summary["types"].items():
        print(f"{qtype:<12}{acc:>8.4f}")
    print(f"{'overall':<12}{summary['overall']:>8.4f}  ({summary['questions']} questions)")
    print(json.dumps(summary))
    return 0


def _eval_reconstruction(args: argparse.Namespace) -> int:
    from blip3o.eval.model_eval import reconstruction_run
    from blip3o.infer.pipeline import BLIP3oPipeline

    pipe = BLIP3oPipeline.from_run(args.run)
    summary = reconstruction_run(pipe, Path(args.run) / "world", n=args.n)
    source = "layouts" if pipe.cfg.decoder_input == "layout" else "CLIP maps"
    print(
        f"held-out images kept correct by the VAE: {summary['vae']:.4f}; "
        f"by the pixel decoder from their {source}: {summary['decoder']:.4f} ({summary['images']} images)"
    )
    print(json.dumps(summary))
    return 0


def _train(args: argparse.Namespace) -> int:
    from blip3o.train.recipe import run_recipe

    cfg = resolve(args.preset, args.overrides)
    summaries = run_recipe(cfg, args.out, resume=args.resume, reuse=args.reuse)
    for stage, summary in summaries.items():
        final = {k: round(v, 4) for k, v in (summary.get("final") or {}).items() if "loss" in k}
        print(f"{stage:<14}{summary.get('steps')} steps  {final}")
    print(f"run: {args.out}")
    return 0


def _study(args: argparse.Namespace) -> int:
    from blip3o.train.study import run_study

    results = run_study(resolve(args.preset, args.overrides), args.out)
    print((Path(args.out) / "study.md").read_text())
    print(
        json.dumps({k: {"overall": v["geneval"]["overall"], "diversity": v["diversity"]} for k, v in results.items()})
    )
    return 0


def _save_images(images: list, out: str) -> int:
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    for k, image in enumerate(images):
        image.save(path / f"{k:04d}.png")
    print(f"wrote {len(images)} images to {path}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    _, pipe = _sampling_pipeline(Path(args.run), args.stage, args.overrides)
    images = pipe(
        args.prompt,
        num_images=args.n,
        seed=args.seed,
        guidance_scale=args.guidance_scale,
        num_inference_steps=args.steps,
        progress=True,
    )
    return _save_images(images, args.out)


def _editing_pipeline(run: str, stage: str | None, overrides: Sequence[str] = ()):
    from blip3o.infer.next_pipeline import NextPipeline

    _, pipe = _sampling_pipeline(Path(run), stage, overrides)
    if not isinstance(pipe, NextPipeline):
        raise SystemExit(f"{run} is a BLIP3-o run; editing needs a BLIP3o-NEXT run (`blip3o train shapes-next`)")
    return pipe


def _edit(args: argparse.Namespace) -> int:
    from PIL import Image

    pipe = _editing_pipeline(args.run, args.stage, args.overrides)
    images = pipe.edit(
        Image.open(args.image),
        args.prompt,
        num_images=args.n,
        seed=args.seed,
        guidance_scale=args.guidance_scale,
        num_inference_steps=args.steps,
        progress=True,
    )
    return _save_images(images, args.out)


def _eval_edit(args: argparse.Namespace) -> int:
    from blip3o.eval.edit import format_edit_table
    from blip3o.eval.model_eval import edit_run

    pipe = _editing_pipeline(args.run, args.stage, args.overrides)
    out = Path(args.out) if args.out else Path(args.run) / "eval" / "edit"
    summary = edit_run(pipe, Path(args.run) / "world", out, limit=args.limit, seed=args.seed)
    print(format_edit_table(summary))
    print(f"images and results: {out}")
    print(json.dumps(summary))
    return 0


def _chat(args: argparse.Namespace) -> int:
    from PIL import Image

    from blip3o.infer.next_pipeline import load_pipeline

    pipe = load_pipeline(args.run)
    print(pipe.chat(Image.open(args.image), args.prompt, max_new_tokens=args.max_new_tokens))
    return 0


def _eval_ocr(args: argparse.Namespace) -> int:
    from blip3o.eval.ocr import evaluate_ocr_folder

    if _is_run(args.imagedir):  # a trained run: draw its world's held-out words, then read them
        from blip3o.eval.model_eval import ocr_run

        run = Path(args.imagedir)
        cfg, pipe = _sampling_pipeline(run, args.stage, args.overrides)
        out = Path(args.out) if args.out else run / "eval" / "ocr"
        summary = ocr_run(pipe, run / "world", cfg.eval, out, n=args.limit)
    else:
        summary = evaluate_ocr_folder(args.imagedir, args.out)
    print(
        f"OCR reward: mean {summary['mean']:.4f} over {summary['images']} images (exact reads {summary['exact']:.4f})"
    )
    print(json.dumps(summary))
    return 0


def _rl_grpo(args: argparse.Namespace) -> int:
    from blip3o.rl.grpo import grpo_run_config, run_grpo

    cfg = grpo_run_config(
        args.run, args.preset, args.overrides, rewards=args.rewards, prompts=args.prompts, http_url=args.http_url
    )
    summary = run_grpo(args.run, args.out, cfg, resume=args.resume)
    print(f"reward {summary['first_reward']:.4f} at the first step, {summary['last_reward']:.4f} at the last")
    print(f"run: {args.out} (weights: stage grpo)")
    print(json.dumps(summary))
    return 0


def _config_show(args: argparse.Namespace) -> int:
    print(dumps_yaml(resolve(args.preset, args.overrides)), end="")
    return 0


def _config_presets(args: argparse.Namespace) -> int:
    from blip3o.config.grpo import GRPO_PRESETS

    for title, presets in (("recipes (blip3o train)", PRESETS), ("GRPO (blip3o rl grpo --preset)", GRPO_PRESETS)):
        print(f"{title}:")
        for name, fn in presets.items():
            doc = (fn.__doc__ or "").strip().splitlines()
            print(f"  {name:<26}{doc[0] if doc else ''}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from blip3o.demo import run_demo
    from blip3o.eval.geneval import format_table

    cfg = resolve(args.preset, args.overrides)
    summary = run_demo(cfg, args.out)
    print(format_table(summary["geneval_oracle"]))
    checks = summary["self_check"]
    print(
        f"degraded (blur + noise): {checks['degraded']['overall']:.4f}; "
        f"mismatched prompts: {checks['mismatch']['overall']:.4f}; OCR mean reward: {summary['ocr']['mean']:.4f}"
    )
    print(f"report: {Path(args.out) / 'report' / 'index.html'}")
    if "blip3o" in summary:
        model = summary["blip3o"]
        print(
            f"BLIP3-o: GenEval-shapes {model['geneval']['overall']:.4f}, VQA {model['vqa']['overall']:.4f}, "
            f"trained in {model['train_seconds']:.0f} s"
        )
    if "next" in summary:
        nxt = summary["next"]
        print(
            f"BLIP3o-NEXT: GenEval-shapes {nxt['geneval']['overall']:.4f}, edit accuracy "
            f"{nxt['edit']['edit_accuracy']:.4f}, consistency {nxt['edit']['consistency']:.4f}, "
            f"trained in {nxt['train_seconds']:.0f} s"
        )
    if "grpo" in summary:
        grpo = summary["grpo"]
        print(
            f"GRPO: reward {grpo['first_reward']:.4f} at the first step, {grpo['last_reward']:.4f} at step "
            f"{grpo['steps']}, in {grpo['seconds']:.0f} s"
        )
    keys = ("geneval_oracle", "ocr", "blip3o", "next", "grpo", "seconds")
    print(json.dumps({k: summary[k] for k in keys if k in summary}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blip3o", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    presets = ", ".join(PRESETS)

    demo = sub.add_parser("demo", help="run the demo (world, scorer self-check, HTML report)")
    demo.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    demo.add_argument("--preset", default="shapes-demo", help=f"config preset ({presets})")
    _overrides(demo)
    demo.set_defaults(fn=_demo)

    world = sub.add_parser("world", help="the shapes world: make data, render ground truth, train a tokenizer")
    wsub = world.add_subparsers(dest="world_command", required=True, metavar="ACTION")
    make = wsub.add_parser("make", help="write webdataset shards, prompts.jsonl and world.json")
    make.add_argument("--out", required=True, help="output directory")
    make.add_argument("--n", type=int, help="number of training samples (world.n_train)")
    make.add_argument("--heldout", type=int, help="number of held-out samples (world.n_heldout)")
    make.add_argument("--seed", type=int, help="world seed (world.seed)")
    make.add_argument("--size", type=int, help="image side in px, 32-512 (world.size)")
    make.add_argument("--preset", default="shapes-demo", help=f"config preset ({presets})")
    _overrides(make)
    make.set_defaults(fn=_world_make)
    oracle = wsub.add_parser("oracle", help="ground-truth renders of a prompts.jsonl in GenEval's folder layout")
    oracle.add_argument("prompts", help="a GenEval-schema prompts.jsonl")
    oracle.add_argument("--out", required=True, help="output image directory")
    oracle.add_argument("-n", type=int, default=4, help="images per prompt (default 4)")
    oracle.add_argument("--size", type=int, default=64, help="image side in px (default 64)")
    oracle.add_argument("--seed", type=int, default=42, help="seed (default 42)")
    oracle.set_defaults(fn=_world_oracle)
    tok = wsub.add_parser("tokenizer", help="train the BPE text tokenizer on a world's text")
    tok.add_argument("world", help="a world directory made by `blip3o world make`")
    tok.add_argument("--out", required=True, help="directory to save the tokenizer to")
    tok.add_argument("--vocab-size", type=int, default=1024, help="vocabulary size (default 1024)")
    tok.set_defaults(fn=_world_tokenizer)

    ev = sub.add_parser("eval", help="evaluate images or runs: GenEval rules, OCR, VQA, editing, reconstruction")
    esub = ev.add_subparsers(dest="eval_command", required=True, metavar="BENCHMARK")
    gen = esub.add_parser("geneval", help="GenEval scores of an image folder in GenEval's layout, or of a trained run")
    gen.add_argument(
        "imagedir",
        help="a GenEval-layout image folder, or a run directory (its held-out prompts are "
        "sampled into RUN/eval/geneval first)",
    )
    gen.add_argument("--out", help="per-image results (JSON lines); default IMAGEDIR/geneval_results.jsonl")
    _stage_arg(gen)
    gen.add_argument("--threshold", type=float, default=0.5, help="minimum detection confidence (default 0.5)")
    gen.add_argument(
        "--counting-threshold",
        type=float,
        default=0.6,
        help="minimum detection confidence for counting prompts (default 0.6)",
    )
    _overrides(gen)
    gen.set_defaults(fn=_eval_geneval)
    vqa = esub.add_parser("vqa", help="question-answering accuracy of a trained run, per question type")
    vqa.add_argument("run", help="a run directory made by `blip3o train`")
    vqa.add_argument("--split", default="heldout", choices=["heldout", "train"], help="world split (default heldout)")
    vqa.add_argument("--limit", type=int, help="at most this many questions")
    vqa.set_defaults(fn=_eval_vqa)
    rec = esub.add_parser("reconstruction", help="GenEval-rule correctness of held-out images after VAE and decoder")
    rec.add_argument("run", help="a run directory made by `blip3o train`")
    rec.add_argument("--n", type=int, default=100, help="held-out images (default 100)")
    rec.set_defaults(fn=_eval_reconstruction)
    ed = esub.add_parser("edit", help="edit accuracy and consistency of a BLIP3o-NEXT run on held-out triplets")
    ed.add_argument("run", help="a BLIP3o-NEXT run directory made by `blip3o train`")
    ed.add_argument("--out", help="images and results (default RUN/eval/edit)")
    ed.add_argument("--limit", type=int, help="at most this many triplets")
    _stage_arg(ed)
    _overrides(ed)
    ed.add_argument("--seed", type=int, default=42, help="sampling seed (default 42)")
    ed.set_defaults(fn=_eval_edit)
    ocr = esub.add_parser("ocr", help="OCR reward of a GenEval-layout folder, or of a run on its held-out words")
    ocr.add_argument("imagedir", help="image folder (each prompt quotes its target text) or a trained BLIP3o-NEXT run")
    ocr.add_argument(
        "--out", help="folders: the results file (default IMAGEDIR/ocr_results.jsonl); runs: the output directory"
    )
    ocr.add_argument("--limit", type=int, help="runs: at most this many held-out words")
    _stage_arg(ocr)
    _overrides(ocr)
    ocr.set_defaults(fn=_eval_ocr)

    train = sub.add_parser("train", help="train a recipe (all its stages, skipping finished ones) into a run directory")
    train.add_argument("preset", help=f"one of: {presets}")
    train.add_argument("--out", required=True, help="run directory (reused: finished stages are skipped)")
    train.add_argument("--resume", action="store_true", help="continue an interrupted stage from its last checkpoint")
    train.add_argument(
        "--reuse",
        metavar="RUN",
        help="link the world, tokenizer and shared stages (clip, vae, decoder) of this run first, e.g. a "
        "BLIP3-o run for shapes-next (their configs must agree)",
    )
    _overrides(train)
    train.set_defaults(fn=_train)

    study = sub.add_parser("study", help="the paper's study: CLIP+FM vs CLIP+MSE vs VAE+FM, sequential vs joint")
    study.add_argument("--preset", default="shapes-blip3o", help="base recipe (default shapes-blip3o)")
    study.add_argument("--out", required=True, help="study directory (shared stages, one directory per variant)")
    _overrides(study)
    study.set_defaults(fn=_study)

    generate = sub.add_parser("generate", help="text → image with a trained run")
    generate.add_argument("run", help="a run directory made by `blip3o train`")
    generate.add_argument("--prompt", required=True, help="the prompt")
    generate.add_argument("-n", type=int, default=4, help="images (default 4)")
    generate.add_argument("--seed", type=int, default=0, help="seed of the first image; image k uses seed + k")
    generate.add_argument("--guidance-scale", type=float, help="CFG scale (default: the run's config)")
    generate.add_argument("--steps", type=int, help="sampling steps (default: the run's config)")
    generate.add_argument("--out", required=True, help="output directory")
    _stage_arg(generate)
    _overrides(generate)
    generate.set_defaults(fn=_generate)

    edit = sub.add_parser("edit", help="image + instruction → edited image with a trained BLIP3o-NEXT run")
    edit.add_argument("run", help="a BLIP3o-NEXT run directory made by `blip3o train`")
    edit.add_argument("--image", required=True, help="the image to edit")
    edit.add_argument("--prompt", required=True, help='the instruction, e.g. "make the red circle blue"')
    edit.add_argument("-n", type=int, default=1, help="images (default 1)")
    edit.add_argument("--seed", type=int, default=0, help="seed of the first image; image k uses seed + k")
    edit.add_argument("--guidance-scale", type=float, help="SANA CFG scale (default: the run's config)")
    edit.add_argument("--steps", type=int, help="sampling steps (default: the run's config)")
    edit.add_argument("--out", required=True, help="output directory")
    _stage_arg(edit)
    _overrides(edit)
    edit.set_defaults(fn=_edit)

    chat = sub.add_parser("chat", help="image → text: ask a trained run about an image")
    chat.add_argument("run", help="a run directory made by `blip3o train`")
    chat.add_argument("--image", required=True, help="image file")
    chat.add_argument("--prompt", required=True, help="the question")
    chat.add_argument("--max-new-tokens", type=int, default=48, help="answer length limit (default 48)")
    chat.set_defaults(fn=_chat)

    rl = sub.add_parser("rl", help="reinforcement learning of a BLIP3o-NEXT run's image-token policy")
    rsub = rl.add_subparsers(dest="rl_command", required=True, metavar="ALGORITHM")
    grpo = rsub.add_parser("grpo", help="GRPO with verifiable rewards (GenEval rules, OCR, an HTTP reward server)")
    grpo.add_argument("run", help="a BLIP3o-NEXT run directory (or an RL run, to continue from its weights)")
    grpo.add_argument("--out", required=True, help="RL run directory; `blip3o generate/eval` take it like any run")
    grpo.add_argument(
        "--preset", help="GRPO settings (`blip3o config presets`): shapes-geneval (default), shapes-ocr, next-3b-ocr"
    )
    grpo.add_argument("--rewards", help='reward spec, e.g. "geneval", "geneval,ocr", "geneval:0.7,ocr:0.3"')
    grpo.add_argument("--prompts", help="training prompts: .jsonl records or a text file, one prompt per line")
    grpo.add_argument("--http-url", help="URL of the reward server for the http reward")
    grpo.add_argument("--resume", action="store_true", help="continue an interrupted RL run from its checkpoint")
    _overrides(grpo)
    grpo.set_defaults(fn=_rl_grpo)

    cfg = sub.add_parser("config", help="show presets and resolved configs")
    csub = cfg.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = csub.add_parser("show", help="print a preset with overrides applied, as YAML")
    show.add_argument("preset", help=f"one of: {presets}")
    _overrides(show)
    show.set_defaults(fn=_config_show)
    lst = csub.add_parser("presets", help="list the presets")
    lst.set_defaults(fn=_config_presets)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may follow options (`train PRESET --out RUN a.b=1`); argparse leaves those to us.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any("=" not in e or e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.fn(args)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"blip3o: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
