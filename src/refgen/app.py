"""`refgen app`: a web page over `refgen.pipeline.IdentityPipeline` (Gradio; the optional extra `refgen[app]`).

Per person: reference photos or a residual file, and an alpha. Photos become a residual through the head when
the app has one (`--head`, with `--vl-model`), otherwise by teacher inversion (`IdentityPipeline.invert`, the
engine of `refgen invert`; finished inversions are kept in the work folder and reused for the same photos).
A prompt box shows the `~ID~` slots it finds; seeds, steps, CFG and size; a gallery, an alpha x seed grid tab and
a zip of the images with their JSON record.

`IdentityApp` is the page's logic without Gradio (what the handlers call); `build_page` lays out the page;
`serve` loads the models once and serves on 127.0.0.1 unless told otherwise. With no `--model` the app runs the
toy Qwen-Image refgen ships, on the CPU, so it works on a fresh machine without weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tempfile
import time
import traceback
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Gradio reports usage to its servers unless told not to; the app talks to no one but its own page.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


@dataclass
class AppConfig:
    model: str | None = None      # Qwen-Image hub id or folder; None: the toy model refgen ships
    vl_model: str | None = None   # with head: the Qwen3-VL its features came from (toy model: the shipped toy VL)
    head: str | None = None       # head checkpoint from `refgen train-head`; None: photos are inverted
    device: str | None = None     # None: "cpu" for the toy model (it is small), CUDA for any other
    dtype: str | None = None      # None: fp32 on the CPU, bf16 on CUDA
    offload: str = "none"
    compile: bool = False
    host: str = "127.0.0.1"       # loopback: the page is not reachable from other machines unless asked
    port: int = 7860
    people: int = 3               # person panels on the page
    invert_steps: int | None = None  # the page's default; None: 100 on the toy model, InvertConfig's otherwise
    threads: int = 0              # torch CPU threads; 0: the cores other processes leave free
    work_dir: str | None = None   # inversions and downloads; None: a temporary folder

    def __post_init__(self):
        if not 1 <= self.people <= 6:
            raise ValueError(f"people must be 1..6 (person panels on the page), got {self.people}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0..65535, got {self.port}")
        if self.invert_steps is not None and self.invert_steps < 1:
            raise ValueError(f"invert_steps must be >= 1, got {self.invert_steps}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0: pick from the free cores), got {self.threads}")
        if self.vl_model and not self.head:
            raise ValueError("--vl-model is for reference photos through a head: give --head too (without a head "
                             "the app inverts the photos and needs no vision model)")

    @property
    def toy(self) -> bool:
        return self.model is None


@dataclass
class PageDefaults:
    """What the page starts with: sizes and prompts that suit the model."""
    prompt: str
    height: int
    width: int
    steps: int
    invert_steps: int
    max_side: int


def page_defaults(cfg: AppConfig) -> PageDefaults:
    from refgen.identity.invert import InvertConfig

    if cfg.toy:  # the toy model is trained at 64 px on these phrasings (docs/toyworld.md)
        return PageDefaults("A photo of two people on a beach: on the left, ~ID~; on the right, ~ID~.", 64, 64, 20,
                            cfg.invert_steps or 100, 256)
    return PageDefaults("~ID~ and ~ID~ on a beach", 768, 512, 28, cfg.invert_steps or InvertConfig().steps, 2048)


def invert_config(cfg: AppConfig, steps: int):
    """The inversion the page runs for photos without a head: the toy settings of `refgen demo` on the toy model
    (64 px, lr 0.05, 4 images per step, logit-normal sigmas), InvertConfig's defaults otherwise; no QA grid."""
    from refgen.identity.invert import InvertConfig

    if cfg.toy:
        from refgen.toyworld.benchmark import toy_invert_settings

        return InvertConfig(**toy_invert_settings(steps=steps, images_per_step=4))
    return InvertConfig(steps=steps, qa=False)


Report = Callable[[float, str], None]  # (fraction done, what is running): the page's progress bar


@dataclass
class PersonInput:
    photos: list[str]             # uploaded image files
    residual: str | None          # an uploaded residual file
    alpha: float

    @property
    def given(self) -> bool:
        return bool(self.photos) or bool(self.residual)


class IdentityApp:
    """The page's logic on one IdentityPipeline: turns what the page holds into people and images."""

    def __init__(self, ip, cfg: AppConfig, work_dir: str | Path):
        self.ip, self.cfg, self.work_dir = ip, cfg, Path(work_dir)
        self.defaults = page_defaults(cfg)

    # ---- prompt ----------------------------------------------------------------------------------------
    def slot_repeat(self) -> int:
        """How wide the people made from photos will be: the head's window, or the page's inversion setting
        (an uploaded residual file carries its own, and people of two widths in one prompt are refused)."""
        if self.ip.head is not None:
            from refgen.identity.slots import repeat_of_length

            return repeat_of_length(self.ip.pipe.tokenizer, self.ip.head.L, f"head {self.ip.head_path}")
        return invert_config(self.cfg, self.defaults.invert_steps).slot_repeat

    def slots_text(self, prompt: str) -> str:
        """What the slot box shows: each `~ID~`'s token window, or why the prompt cannot be read."""
        from refgen.identity.slots import SlotError

        try:
            rows = self.ip.slots(prompt or "", slot_repeat=self.slot_repeat())
        except SlotError as e:
            return f"**Prompt:** {md_escape(e)}"
        if not rows:
            return "No `~ID~` in the prompt: it renders as plain text (people are not used)."
        where = ", ".join(f"slot {r['slot'] + 1} at tokens {r['start']}-{r['start'] + r['length'] - 1}" for r in rows)
        return (f"**{len(rows)} slot{'s' if len(rows) > 1 else ''}** `~ID~` found (L = {rows[0]['length']} tokens "
                f"each): {where}. Person k fills slot k, left to right.")

    # ---- people ----------------------------------------------------------------------------------------
    def residual_of(self, k: int, person: PersonInput, invert_steps: int):
        """Person k's SlotResidual and how it was made."""
        if person.photos and person.residual:
            raise ValueError(f"person {k + 1}: give reference photos or a residual file, not both")
        if person.residual:
            return self.ip.load_residual(person.residual), f"residual file {Path(person.residual).name}"
        n = len(person.photos)
        if self.ip.head is not None:
            return self.ip.residual_from_refs(person.photos), f"{n} photo(s) through the head"
        icfg = invert_config(self.cfg, int(invert_steps))
        # one folder per inversion setting: a finished inversion of the same photos is reused, never mixed up
        key = hashlib.sha256(json.dumps(dataclasses.asdict(icfg), sort_keys=True).encode()).hexdigest()[:12]
        r = self.ip.invert(person.photos, config=icfg, out=self.work_dir / "inversions" / key)
        return r, f"{n} photo(s), teacher inversion ({icfg.steps} steps)"

    def people(self, persons: list[PersonInput], prompt: str, invert_steps: int, report: Report | None = None):
        """(residuals, alphas, descriptions) of the persons given, in order; the slot count is checked first.
        `report(fraction, text)` hears which person is being made (the first 90 % of the work)."""
        given = [(k, p) for k, p in enumerate(persons) if p.given]
        self.ip.slots(prompt, len(given))  # before any photo goes through a model: the CLI's message if it differs
        made = []
        for j, (k, p) in enumerate(given):
            how = ("reading the residual file" if p.residual else "photos through the head" if self.ip.head is not None
                   else f"teacher inversion of {len(p.photos)} photo(s), {int(invert_steps)} steps (a finished one "
                        "is reused)")
            _say(report, 0.9 * j / len(given), f"person {k + 1} of {len(given)}: {how}")
            made.append(self.residual_of(k, p, invert_steps))
        return ([r for r, _ in made], [p.alpha for _, p in given],
                [{"person": k + 1, "alpha": p.alpha, "from": how} for (k, p), (_, how) in zip(given, made)])

    # ---- images ----------------------------------------------------------------------------------------
    def generate(self, persons: list[PersonInput], prompt: str, seeds: str, steps: int, true_cfg: float,
                 height: int, width: int, negative_prompt: str, invert_steps: int, report: Report | None = None):
        """(PIL images, zip file with the images and their JSON, a one-line summary)."""
        from refgen.artifacts import atomic_write_bytes, provenance

        t0 = time.time()
        seed_list = _parse("seeds", seeds)
        residuals, alphas, described = self.people(persons, prompt, invert_steps, report)
        _say(report, 0.9, f"rendering {len(seed_list)} image(s), {int(steps)} steps each")
        kw = dict(seeds=seed_list, steps=int(steps), true_cfg=float(true_cfg), height=int(height), width=int(width),
                  negative_prompt=negative_prompt)
        images = self.ip(prompt, residuals, alphas, progress=True, **kw)
        record = provenance(kind="app_generate", model=self.ip.model_id, head=self.ip.head_path,
                            device=str(self.ip.device), dtype=str(self.ip.dtype).replace("torch.", ""), prompt=prompt,
                            people=described, slots=self.ip.slots_for(prompt, residuals), **kw,
                            images=[f"seed{s}.png" for s in seed_list])
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            for s, im in zip(seed_list, images):
                png = io.BytesIO()
                im.save(png, format="PNG")
                z.writestr(f"seed{s}.png", png.getvalue())
            z.writestr("generate.json", json.dumps(record, indent=2, default=str) + "\n")
        zip_path = self.work_dir / "downloads" / f"refgen_{time.strftime('%Y%m%d_%H%M%S')}_{os.urandom(3).hex()}.zip"
        atomic_write_bytes(zip_path, buf.getvalue())
        who = "; ".join(f"person {d['person']}: {d['from']}, α {d['alpha']:g}" for d in described) or "no people"
        return images, zip_path, md_escape(f"{len(images)} image(s) in {time.time() - t0:.1f} s ({who}).")

    def alpha_grid(self, persons: list[PersonInput], prompt: str, grid_alphas: str, seeds: str, steps: int,
                   true_cfg: float, height: int, width: int, negative_prompt: str, invert_steps: int,
                   report: Report | None = None):
        """(grid image file, summary): rows multiply every person's alpha, columns are seeds."""
        from refgen.identity.render import RenderConfig

        t0 = time.time()
        rows = _parse("grid alphas", grid_alphas)
        rc = RenderConfig(prompt=prompt, alphas=rows, seeds=_parse("seeds", seeds), steps=int(steps),
                          true_cfg=float(true_cfg), negative_prompt=negative_prompt, height=int(height),
                          width=int(width))
        residuals, alphas, described = self.people(persons, prompt, invert_steps, report)
        _say(report, 0.9, f"rendering {len(rows) * len(rc.seeds)} image(s), {int(steps)} steps each")
        out = Path(tempfile.mkdtemp(prefix="grid_", dir=self.work_dir / "downloads"))
        rec = self.ip.render_grid(rc, residuals, out, alphas=alphas, progress=True)
        return (out / rec["grid"], f"{len(rows)} α rows x {len(rc.seeds)} seeds in {time.time() - t0:.1f} s "
                f"(rows multiply each person's α).")


def _say(report: Report | None, fraction: float, text: str) -> None:
    if report is not None:
        report(fraction, text)


def _parse(what: str, text: str) -> list:
    """Seeds ('0-3', '1,5') or numbers ('0.5,1'), by the CLI's own parsers; a bad value names the field."""
    import argparse

    from refgen.cli import parse_floats, parse_seeds

    try:
        out = parse_seeds(text) if what == "seeds" else parse_floats(text)
    except argparse.ArgumentTypeError as e:
        raise ValueError(f"{what}: {e}") from None
    if not out:
        raise ValueError(f"{what}: none given")
    return out


def _user_error(e: BaseException) -> bool:
    """Bad input or a policy refusal (the CLI's one-line errors), or an inversion that stopped without a result."""
    from refgen.cli import _is_user_error
    from refgen.pipeline import InversionError

    return _is_user_error(e) or isinstance(e, InversionError)


def md_escape(text: str) -> str:
    """Plain text for a Markdown box: `~ID~` would otherwise render as struck-through "ID"."""
    return "".join("\\" + c if c in "\\`*_~[]<>#|" else c for c in str(text))


def error_text(e: BaseException) -> str:
    """What the page shows for a failure: the message of a bad input (as the CLI prints it), never a traceback;
    anything else is named by its type and its traceback goes to the server's log."""
    if _user_error(e):
        return f"**Error:** {md_escape(e)}"
    traceback.print_exception(e)
    return f"**Internal error** ({type(e).__name__}): {md_escape(e)}. The server's log has the details."


def _person_inputs(n: int) -> list:
    """Per person: reference photos, or an identity file, and an alpha (3 inputs each, person by person)."""
    import gradio as gr

    inputs = []
    with gr.Row():
        for k in range(n):
            with gr.Column(variant="panel", min_width=220):
                gr.Markdown(f"**Person {k + 1}**: fills slot {k + 1}")
                inputs += [
                    gr.File(label="Reference photos (1-n)", file_count="multiple", file_types=["image"],
                            elem_id=f"person{k + 1}_photos", height=140),
                    gr.File(label="or an identity file from refgen invert (.safetensors)", file_types=[".safetensors"],
                            elem_id=f"person{k + 1}_residual", height=120),
                    gr.Slider(-1.0, 3.0, value=1.0, step=0.05, label="α", elem_id=f"person{k + 1}_alpha"),
                ]
    return inputs


def _sampling_inputs(d: PageDefaults, inverts: bool) -> list:
    """[seeds, steps, true_cfg, height, width, negative prompt, inversion steps], in that order."""
    import gradio as gr

    with gr.Row():
        seeds = gr.Textbox(value="0-3", label="Seeds (0-3, or 1,5,9)", elem_id="seeds")
        steps = gr.Slider(2, 100, value=d.steps, step=1, label="Steps", elem_id="steps")
        true_cfg = gr.Slider(1.0, 10.0, value=4.0, step=0.5, label="True CFG", elem_id="true_cfg")
        height = gr.Slider(16, d.max_side, value=d.height, step=16, label="Height", elem_id="height")
        width = gr.Slider(16, d.max_side, value=d.width, step=16, label="Width", elem_id="width")
    with gr.Row():
        negative = gr.Textbox(value=" ", label="Negative prompt", elem_id="negative_prompt")
        invert_steps = gr.Slider(1, max(1000, d.invert_steps), value=d.invert_steps, step=1,
                                 label="Inversion steps (photos, without a head)", elem_id="invert_steps",
                                 visible=inverts)
    return [seeds, steps, true_cfg, height, width, negative, invert_steps]


def build_page(app: IdentityApp):
    """The Gradio page. Element ids (`person1_photos`, `prompt`, `generate`, `gallery`, `status`, ...) are stable:
    the browser test finds the page's parts by them."""
    import gradio as gr

    d, cfg, ip = app.defaults, app.cfg, app.ip
    how = ("through the head" if ip.head is not None else
           "by teacher inversion (the engine of `refgen invert`; a finished one is reused for the same photos)")
    model = "the toy Qwen-Image refgen ships" if cfg.toy else f"`{md_escape(ip.model_id)}`"
    header = (f"# refgen\nModel: {model}, on {ip.device}, {str(ip.dtype).removeprefix('torch.')}. "
              f"Reference photos become a person (learnt tokens or a residual) {how}.")

    def persons_of(values) -> list[PersonInput]:
        out = []
        for k in range(cfg.people):
            photos, residual, alpha = values[3 * k: 3 * k + 3]
            out.append(PersonInput([str(p) for p in (photos or [])], str(residual) if residual else None,
                                   float(alpha)))
        return out

    with gr.Blocks(title="refgen", analytics_enabled=False) as page:
        gr.Markdown(header)
        person_inputs = _person_inputs(cfg.people)
        prompt = gr.Textbox(value=d.prompt, label="Prompt: ~ID~ marks each person, left to right", lines=2,
                            elem_id="prompt")
        slots = gr.Markdown(app.slots_text(d.prompt), elem_id="slots")
        common = [prompt, *_sampling_inputs(d, ip.head is None)]
        status = gr.Markdown(elem_id="status")
        with gr.Tabs():
            with gr.Tab("Images"):
                go = gr.Button("Generate", variant="primary", elem_id="generate")
                gallery = gr.Gallery(label="Images", columns=4, height=320, format="png", object_fit="contain",
                                     elem_id="gallery")
                download = gr.File(label="Download: the images and generate.json", elem_id="download")
            with gr.Tab("Alpha grid"):
                grid_alphas = gr.Textbox(value="0,0.5,1,1.5", label="α multipliers, one row each", elem_id="grid_alphas")
                grid_go = gr.Button("Render the α grid", elem_id="grid_button")
                grid = gr.Image(label="α x seed grid", type="filepath", elem_id="grid", height=420)

        def on_generate(prompt, seeds, steps, true_cfg, height, width, negative, invert_steps, *people,
                        progress=gr.Progress()):
            try:
                images, zip_path, summary = app.generate(persons_of(people), prompt, seeds, steps, true_cfg, height,
                                                         width, negative, invert_steps,
                                                         lambda f, text: progress(f, desc=text))
                return images, str(zip_path), summary
            except Exception as e:  # noqa: BLE001 - the page shows every failure as text, the log keeps the rest
                return [], None, error_text(e)

        def on_grid(prompt, seeds, steps, true_cfg, height, width, negative, invert_steps, grid_alphas, *people,
                    progress=gr.Progress()):
            try:
                path, summary = app.alpha_grid(persons_of(people), prompt, grid_alphas, seeds, steps, true_cfg,
                                               height, width, negative, invert_steps,
                                               lambda f, text: progress(f, desc=text))
                return str(path), summary
            except Exception as e:  # noqa: BLE001
                return None, error_text(e)

        prompt.change(app.slots_text, prompt, slots, show_progress="hidden")
        go.click(on_generate, common + person_inputs, [gallery, download, status])
        grid_go.click(on_grid, common + [grid_alphas] + person_inputs, [grid, status])
    return page


def load(cfg: AppConfig):
    """The IdentityPipeline the app serves: the toy model on the CPU unless another model or device is given."""
    import torch

    from refgen.pipeline import IdentityPipeline
    from refgen.runtime import pick_cpu_threads

    model, vl_model = cfg.model, cfg.vl_model
    if cfg.toy:
        from refgen.toyworld.benchmark import default_model

        model = default_model()
        if cfg.head and not vl_model:
            from refgen.toyworld import vl

            vl_model = str(vl.load_path())
    device = cfg.device or ("cpu" if cfg.toy else None)
    dtype = cfg.dtype or ("fp32" if device == "cpu" else "bf16")
    if device == "cpu":
        torch.set_num_threads(cfg.threads or pick_cpu_threads())
    return IdentityPipeline.from_pretrained(model, vl_model=vl_model, head=cfg.head, device=device, dtype=dtype,
                                            offload=cfg.offload, compile=cfg.compile)


def serve(cfg: AppConfig, block: bool = True):
    """Load the models once, build the page, serve it on cfg.host:cfg.port."""
    ip = load(cfg)
    work = Path(cfg.work_dir) if cfg.work_dir else Path(tempfile.mkdtemp(prefix="refgen_app_"))
    (work / "downloads").mkdir(parents=True, exist_ok=True)
    page = build_page(IdentityApp(ip, cfg, work))
    page.queue(default_concurrency_limit=1)  # one model, one job at a time; the rest wait in the queue
    print(f"refgen app: {ip!r}; work folder {work}", flush=True)
    page.launch(server_name=cfg.host, server_port=cfg.port, share=False, ssr_mode=False, show_error=False,
                allowed_paths=[str(work)], prevent_thread_lock=not block, footer_links=[])
    return page
