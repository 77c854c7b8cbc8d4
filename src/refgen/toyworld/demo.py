"""`refgen demo`: the whole identity path on the embedded toy model, on a CPU, in a few minutes.

1. two people from the toy world become reference folders (`seed_<id>/`, 3-5 photos each)
2. teacher inversion of both, briefly (the real `refgen invert` code, toy-sized settings)
3. an alpha x seed grid per person, and one image with both people (left, right); the same two people once more
   from the shipped toy head's reading of their photos (no inversion), and from that reading refined by a few
   anchored inversion steps (the head as an inversion start)
4. the recognizer reads every picture; the demo prints what it saw and where the pictures are

Nothing here is special to the demo: it calls the functions behind `refgen invert`, `refgen render` and
`refgen generate`. Re-running reuses the finished inversions.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class DemoConfig:
    model: str = ""                     # "" = the embedded toy model
    device: str = "cpu"                 # the toy model is ~18M parameters: the CPU is allowed
    identities: list[int] = field(default_factory=lambda: [200_003, 200_011])
    invert_steps: int = 300             # sized so the whole demo takes ~2 min on 2 CPU cores (docs/toyworld.md)
    images_per_step: int = 4
    lr: float = 0.05
    sigma_sampling: str = "logit_normal"  # beat uniform sigmas on the toy world (47 % vs 33 % identity)
    pair_alpha: float = 1.0             # the benchmark's best teacher alpha
    alphas: list[float] = field(default_factory=lambda: [0.0, 1.0, 1.4, 1.8])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    scene: str = "beach"
    render_steps: int = 20
    true_cfg: float = 4.0
    threads: int = 0                    # torch CPU threads; 0 = the cores other processes leave free
    # Both people also from the shipped toy head (photos -> tokens, with its slot roles): per-person inversions
    # do not compose in one prompt on the toy world, a head trained on two-person images does (docs/head.md).
    head: bool = True
    # The head's pair also rendered with identity guidance (SamplingConfig.id_guidance), at the value chosen on
    # validation people for the shipped head (docs/head.md); 0 renders it with plain true CFG like the inverted pair.
    head_id_guidance: float = 0.5
    # Both people once more from the head's reading refined by this many inversion steps anchored to it
    # (start_weight 1): the teacher that held one person and pairs best on the toy world (docs/benchmarks.md). 0
    # skips it. Redone on every run: it takes seconds, and a head's start is not a setting a finished run records.
    refine_steps: int = 50

    def __post_init__(self):
        from refgen.toyworld import world

        if len(self.identities) != 2:
            raise ValueError(f"the demo uses exactly two identities, got {self.identities}")
        if self.scene not in world.SCENES:
            raise ValueError(f"scene {self.scene!r} is not one of {world.SCENES}")
        if self.invert_steps < 1 or self.render_steps < 2:
            raise ValueError("invert_steps >= 1 and render_steps >= 2 required")
        if not self.head_id_guidance >= 0:
            raise ValueError(f"head_id_guidance must be >= 0, got {self.head_id_guidance}")
        if self.refine_steps < 0 or (self.refine_steps and not self.head):
            raise ValueError(f"refine_steps must be >= 0 and needs head=True (it refines the head's reading), got "
                             f"{self.refine_steps} with head={self.head}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0 = pick from the free cores), got {self.threads}")
        if self.head and self.model:
            raise ValueError(f"head=True: the shipped toy head was trained against the embedded toy model's text "
                             f"encoder, not {self.model!r}; set head=False")


def run_demo(cfg: DemoConfig, out: str | Path, progress: bool = True) -> dict:
    from refgen.artifacts import atomic_save_image, atomic_write_json, provenance
    from refgen.grid import make_grid

    from refgen.identity.invert import teacher_file
    from refgen.identity.render import load_pipeline
    from refgen.pipeline import IdentityPipeline
    from refgen.images import scan
    from refgen.toyworld import recognizer as R
    from refgen.toyworld.benchmark import default_model
    from refgen.toyworld.identities import make_identities

    from refgen.runtime import pick_cpu_threads

    threads = cfg.threads or pick_cpu_threads()
    if cfg.device == "cpu":
        torch.set_num_threads(threads)
    out = Path(out)
    t0 = time.time()
    say = print if progress else (lambda *a, **k: None)
    say(f"refgen demo: {cfg.device}" + (f", {threads} torch threads" if cfg.device == "cpu" else ""))
    model = cfg.model or default_model()
    ids_root = out / "identities"
    for i in cfg.identities:
        make_identities(ids_root, n=1, seed=i, progress=False)
    idents = {x.id: x for x in scan(ids_root).identities}
    chosen = [idents[f"seed_{i}"] for i in cfg.identities]

    pipe = load_pipeline(model, cfg.device, "bf16" if cfg.device.startswith("cuda") else "fp32")
    _invert(cfg, pipe, model, chosen, out, say, progress)
    t_inv = time.time() - t0

    ip = IdentityPipeline(pipe, model)
    people = [ip.load_residual(teacher_file(out / "teacher" / i.id)) for i in chosen]  # tokens or residuals
    net = R.load(device=cfg.device)
    summary = {"identities": {}, "pictures": {}}
    for ident, person in zip(chosen, people):
        summary["identities"][ident.id] = _alpha_grid(cfg, ip, net, ident, person, out, say, progress)
        summary["pictures"][f"alpha grid {ident.id}"] = str(out / "grids" / ident.id / "grid.png")
    pair_imgs, summary["two_people"] = _two_people(cfg, ip, net, chosen, people, say, progress)
    rows, labels = [pair_imgs], ["inverted"]
    if cfg.head:
        from refgen.toyworld.benchmark import default_head, default_vl_model

        ip.load_head(default_head(), default_vl_model())
        by_head = [ip.residual_from_refs(i.path) for i in chosen]
        head_imgs, summary["two_people_head"] = _two_people(cfg, ip, net, chosen, by_head, say, progress,
                                                            cfg.head_id_guidance)
        rows, labels = rows + [head_imgs], labels + ["toy head"]
        if cfg.refine_steps:  # rendered with the head still loaded: its slot roles apply, as to any two people
            refined = _refine(cfg, ip, chosen, by_head, out, say, progress)
            imgs, summary["two_people_refined"] = _two_people(cfg, ip, net, chosen, refined, say, progress)
            rows, labels = rows + [imgs], labels + [f"head + {cfg.refine_steps} steps"]
    refs = [_ref_images(i) for i in chosen]
    atomic_save_image(make_grid(rows, labels, [f"seed {s}" for s in cfg.seeds]), out / "two_people.png")
    atomic_save_image(make_grid([r[:3] for r in refs], [i.id for i in chosen], ["ref 1", "ref 2", "ref 3"]),
                      out / "references.png")
    summary["pictures"]["two people"] = str(out / "two_people.png")
    summary["pictures"]["references"] = str(out / "references.png")
    summary["seconds"] = {"identities+inversion": t_inv, "total": time.time() - t0}
    atomic_write_json(out / "demo.json", provenance(dataclasses.asdict(cfg), model=model, threads=threads, **summary))
    return summary


def _invert_config(cfg: DemoConfig, steps: int, **extra):
    """The demo's inversion settings (both people in one batch, each photo in its own sentence), `extra` on top."""
    from refgen.identity.invert import InvertConfig
    from refgen.toyworld.benchmark import toy_invert_settings

    return InvertConfig(**toy_invert_settings(steps=steps, lr=cfg.lr, images_per_step=cfg.images_per_step,
                                              sigma_sampling=cfg.sigma_sampling, identities_per_batch=2,
                                              image_prompts=True, **extra))


def _invert(cfg: DemoConfig, pipe, model: str, chosen: list, out: Path, say, progress: bool) -> None:
    """Both identities inverted (each photo in its own sentence); finished ones made with these settings are kept,
    ones made with other settings are redone, so demo.json never describes stale pictures."""
    from refgen.identity.invert import Inverter

    inv = Inverter(pipe, _invert_config(cfg, cfg.invert_steps), out / "teacher", model_id=model, progress=progress)
    for i in chosen:
        diff = inv.settings_diff(i)
        if diff:
            say(f"{i.id}: inverted earlier with other settings ({', '.join(diff)}); inverting again")
            shutil.rmtree(inv.dir(i))  # all of it: the old run's metrics log would otherwise be appended to
    todo = [i for i in chosen if not inv.is_complete(i)]
    say(f"inversion: {len(todo)} of {len(chosen)} identities to invert ({cfg.invert_steps} steps)"
        if todo else "inversion: both identities already inverted with these settings")
    inv.run(chosen)


def _refine(cfg: DemoConfig, ip, chosen: list, starts: list, out: Path, say, progress: bool) -> list:
    """Each person inverted from the head's reading of their photos, anchored to it (`refgen invert --start-head`),
    into OUT/teacher_from_head/; the people it made."""
    from refgen.identity.invert import teacher_file

    icfg = _invert_config(cfg, cfg.refine_steps, start_weight=1.0)
    root = out / "teacher_from_head"
    shutil.rmtree(root, ignore_errors=True)
    say(f"refining the head's reading of both people: {cfg.refine_steps} anchored inversion steps")
    ip.invert_identities(chosen, icfg, root, progress=progress, start={i.id: p.tensor for i, p in zip(chosen, starts)})
    return [ip.load_residual(teacher_file(root / i.id)) for i in chosen]


def _alpha_grid(cfg: DemoConfig, ip, net, ident, person, out: Path, say, progress: bool) -> dict:
    """One person's alpha x seed grid on the demo's scene, read by the recognizer: {attributes, per_alpha}."""
    from PIL import Image

    from refgen.identity.render import RenderConfig
    from refgen.toyworld import recognizer as R
    from refgen.toyworld import world
    from refgen.toyworld.benchmark import SCENE_PROMPT, attributes_of, score

    where = world.SCENE_PHRASES[cfg.scene][0]
    rc = RenderConfig(prompt=SCENE_PROMPT.format(where=where), alphas=cfg.alphas, seeds=cfg.seeds,
                      steps=cfg.render_steps, true_cfg=cfg.true_cfg, height=64, width=64, batch_size=64)
    say(f"rendering {ident.id}: {len(cfg.alphas)} alphas x {len(cfg.seeds)} seeds")
    rec = ip.render_grid(rc, [person], out / "grids" / ident.id, progress=progress)
    images = [Image.open(out / "grids" / ident.id / f) for f in rec["images"]]
    preds = R.predict(net, images, cfg.device)
    attrs, S = attributes_of(ident.path), len(cfg.seeds)
    per_alpha = {f"{a:g}": score(preds[i * S:(i + 1) * S], [{"people": [attrs], "scene": cfg.scene}] * S)
                 for i, a in enumerate(cfg.alphas)}  # render_grid's images are row-major: alpha rows
    return {"attributes": attrs, "per_alpha": per_alpha}


def _two_people(cfg: DemoConfig, ip, net, chosen: list, people: list, say, progress: bool,
                id_guidance: float = 0.0) -> tuple[list, dict]:
    """Both people in one prompt, left then right, each with its own identity: (images, recognizer's score)."""
    from refgen.toyworld import recognizer as R
    from refgen.toyworld import world
    from refgen.toyworld.benchmark import PAIR_PROMPT, attributes_of, score

    where = world.SCENE_PHRASES[cfg.scene][0]
    say(f"rendering both people in one picture: {len(cfg.seeds)} seeds")
    imgs = ip(PAIR_PROMPT.format(where=where), people, [cfg.pair_alpha, cfg.pair_alpha], seeds=cfg.seeds,
              steps=cfg.render_steps, true_cfg=cfg.true_cfg, height=64, width=64, batch_size=64,
              id_guidance=id_guidance, progress=progress)
    return imgs, score(R.predict(net, imgs, cfg.device),
                       [{"people": [attributes_of(i.path) for i in chosen], "scene": cfg.scene}] * len(cfg.seeds))


def _ref_images(ident):
    from refgen.images import load_rgb

    return [load_rgb(p) for p in ident.images]
