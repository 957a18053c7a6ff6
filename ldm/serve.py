"""An HTTP server speaking the AUTOMATIC1111 web UI's API (/sdapi/v1/...), so that its clients (Krita AI plugins,
SillyTavern, Open WebUI, scripts) draw with one of our model folders.

    python -m ldm.serve --model ldm/assets/shapes64 --port 7860
    curl -s 127.0.0.1:7860/sdapi/v1/txt2img -d '{"prompt": "a red circle", "steps": 4, "seed": 1}'

The model is loaded once, at start-up, with the CLIs' model flags (--lora, --embedding, --dtype, --device, ...);
any other flag of add_model_args given at start-up (--teacher, --guidance-rescale, --pag, ...) is a default of
every request. A request is translated into the flags of `python -m ldm.txt2img` / `ldm.img2img` / `ldm.inpaint`
and checked by their parsers and checks, so an image is what the CLI draws with those flags, and its PNG carries
the same text chunks (`python -m ldm.txt2img --replay` redraws a txt2img one). Their usage errors, bad JSON, wrong
types and A1111 features we lack (given a value other than their default) answer HTTP 422 {"error", "detail"}.

Endpoints: POST txt2img, img2img (with "mask": inpainting), png-info, interrupt, options, refresh-loras; GET samplers,
schedulers, sd-models, loras, options, progress, latent-upscale-modes, sd-vae, prompt-styles. A prompt's
<lora:NAME:WEIGHT> tags (found in --lora-dir) merge for that request only: the weights are restored after it.
ControlNet units (alwayson_scripts.controlnet, the A1111 ControlNet extension's API: ldm.sdapi_controlnet) become
--controlnet / --t2i-adapter flags, their nets found by name in --controlnet-dir and kept loaded; the extension's
GET /controlnet/model_list, module_list and version answer too. No detected maps are appended to the images.
Request fields have A1111's names and meaning: cfg_scale is SD's scale s, our guidance w = s - 1; sampler_name is
an A1111 name ("DPM++ 2M", "Euler a", also "DPM++ 2M Karras") or ours ("dpmpp_2m"); seed -1 is a random seed;
override_settings may set CLIP_stop_at_last_layers (our --clip-skip). Fields left out take the CLIs' defaults
(the model's size, its student's or 25 steps, its guidance, ddim), not A1111's own (512 px, CFG scale 7, ...). The
info of an answer lists the fields it did not read ("unused_fields") and the warnings the run gave. img2img's
resize_mode 0 stretches the image to width x height (A1111's "just resize"), 1 covers and centre-crops (the CLIs'
way).

Caution: one job at a time (a lock; others wait). Each image of a batch is drawn alone, with its own seed, so that
it equals the CLI's draw of that seed and its PNG replays (a batch in one call differs in the last bits, and an
ancestral sampler's noise would come from the first seed). Inpainting is ldm.inpaint's: denoising_strength is its --strength
(1, the default: the masked region from pure noise), inpainting_fill 0 / 1 its --masked-content fill / original, the
mask stays hard (A1111's default mask_blur 4 is accepted, not applied).
/interrupt stops after the current step and answers the images finished before it. FLUX.1 Kontext and
InstructPix2Pix models are refused at img2img (they edit from pure noise: python -m ldm.img2img).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
import traceback
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

from ldm import img2img as img2img_cli, inpaint as inpaint_cli, sdapi, txt2img as txt2img_cli
from ldm.cli import (SAMPLER_NAMES, SPACING_NAMES, add_model_args, check_args, check_run, image_tensor, infotext,
                     load_pipeline, lora_dirs, refuse_instruct, resolve_window, sampling_options, set_clip_skip,
                     settings, tagged_loras)
from ldm.diffusion.samplers import ETA_OPTIONS
from ldm.models.prompt_loras import lora_index, lora_listing
from ldm.sdapi import (IMG2IMG_FIELDS, TXT2IMG_FIELDS, RequestError, cli_parser, edit_inputs, encode_png, field,
                       hires_flags, read_png_info, refuse_unsupported, sampler_flags, sampler_list, scheduler_list,
                       size_flags)
from ldm.sdapi_controlnet import (API_VERSION, default_dirs, model_index, model_list, module_list, read_units,
                                  unit_inputs)


class Interrupted(Exception):
    """/sdapi/v1/interrupt: raised by the step callback, after the current step."""


class Server:
    """The loaded pipeline, the start-up flags each request starts from, the job lock and the progress."""

    def __init__(self, argv: list[str]):
        parser = build_parser()
        args = parser.parse_args(argv)
        self.host, self.port = args.host, args.port
        own = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
        own.add_argument("--host")
        own.add_argument("--port")
        own.add_argument("--controlnet-dir", action="append")
        self.base_argv = own.parse_known_args(argv)[1]      # the model flags, given again with each request
        self.pipe = load_pipeline(parser, args, [])
        self.model = args.model
        self.lora_dirs = lora_dirs(args)                    # where prompts' <lora:NAME> tags look (GET loras)
        self.clip_skip = args.clip_skip                     # the "CLIP_stop_at_last_layers" option, None: the model's
        self.controlnet_dirs = args.controlnet_dir or default_dirs(args.model)    # where units' models are found
        self.nets = {}                                      # the units' nets, loaded once (ldm.cli.load_net)
        self.lock = threading.Lock()
        self.job = {"active": False, "done": 0, "total": 0, "start": 0.0, "interrupt": False}

    def options(self) -> dict:
        return {"sd_model_checkpoint": self.title, "CLIP_stop_at_last_layers": self.clip_skip or 1,
                "samples_format": "png", "sd_vae": "Automatic"}

    @property
    def title(self) -> str:
        return os.path.basename(os.path.normpath(self.model))

    def set_options(self, req: dict) -> None:
        """POST /sdapi/v1/options: CLIP_stop_at_last_layers; a value equal to the current one for the rest."""
        current = self.options()
        for key, value in req.items():
            if key == "CLIP_stop_at_last_layers":
                with self.lock:
                    self.clip_skip = self.apply_clip_skip(cli_parser(txt2img_cli), argparse.Namespace(),
                                                          field(req, key, int))
            elif key == "sd_model_checkpoint" and value in (self.title, self.model):
                continue
            elif key not in current or value != current[key]:
                raise RequestError(f"{key}: this server honours CLIP_stop_at_last_layers only (it serves one model, "
                                   f"{self.title}); got {json.dumps(value)}")

    def apply_clip_skip(self, parser, args, stop: int | None) -> int | None:
        """A1111's CLIP_stop_at_last_layers N -> args.clip_skip, set on the text encoder; 1 (A1111's default,
        the last layer, which it applies to SD 1.x alone) keeps the model's own layer."""
        if stop is not None and stop < 1:
            raise RequestError(f"CLIP_stop_at_last_layers must be >= 1, got {stop}")
        args.clip_skip = None if stop in (None, 1) else stop
        if args.clip_skip is None:
            if getattr(self.pipe.text_encoder, "clip_skip", None) is not None:
                self.pipe.text_encoder.clip_skip = None
        else:
            set_clip_skip(parser, args, self.pipe)
        return args.clip_skip

    def request_args(self, module, req: dict, extra: list[str]):
        """The CLI `module`'s parser and args for a request: the start-up flags, then the request's; checked."""
        prompt = field(req, "prompt", str, "")
        negative = field(req, "negative_prompt", str, "")
        flags = [f"--negative={negative}"] if "negative_prompt" in req else []
        for name, flag, kind in (("steps", "--steps", int), ("cfg_scale", "--guidance", float),
                                 ("eta", "--eta", float)):
            value = field(req, name, kind)
            if value is not None and not math.isfinite(value):
                raise RequestError(f"{name}: must be finite, got {value}")
            if name == "cfg_scale" and value is not None:
                value -= 1                                  # SD's scale s is our w = s - 1 (Imagen's convention)
            if value is not None:
                flags.append(f"{flag}={value!r}")
        flags += sampler_flags(field(req, "sampler_name", str) or field(req, "sampler_index", str),
                               field(req, "scheduler", str))
        parser = cli_parser(module)
        args = parser.parse_args(self.base_argv + flags + extra + ["--", prompt])
        if args.eta == 0 and args.sampler not in ETA_OPTIONS:     # clients send eta 0 for any sampler
            args.eta = None
        overrides = field(req, "override_settings", dict, {})
        for key in overrides:
            if key != "CLIP_stop_at_last_layers" and overrides[key] != self.options().get(key, object()) and \
                    not (key == "sd_model_checkpoint" and overrides[key] == self.model):
                raise RequestError(f"override_settings.{key}: not honoured by this server "
                                   "(only CLIP_stop_at_last_layers; one model)")
        stop = field(overrides, "CLIP_stop_at_last_layers", int, self.clip_skip)
        self.apply_clip_skip(parser, args, stop)
        check_args(parser, args, [prompt])
        check_run(parser, args, self.pipe, [prompt])
        refuse_instruct(parser, args, self.pipe)
        return parser, args

    def run_job(self, draws: list, steps_each: int) -> tuple[list, bool]:
        """Run `draws` (callables taking the step callback) one by one, counting steps for /progress; stops after
        the current step on /interrupt."""
        def callback(state):
            self.job["done"] += 1
            if self.job["interrupt"]:
                raise Interrupted

        self.job.update(active=True, done=0, total=max(1, steps_each * len(draws)), start=time.time(),
                        interrupt=False)
        results = []
        try:
            for draw in draws:
                results.append(draw(callback))
        except Interrupted:
            return results, True
        finally:
            self.job["active"] = False
        return results, False

    def generate(self, req: dict, kind: str) -> dict:
        """txt2img, img2img or (with a mask) inpaint: the A1111 response {images, parameters, info}."""
        unused = refuse_unsupported(req, TXT2IMG_FIELDS if kind == "txt2img" else IMG2IMG_FIELDS)
        seeds, subseeds, strength, batch, n_iter = sdapi.seeds(req)
        extra = size_flags(req, self.pipe.index.resolution)
        if kind == "txt2img":
            module, image, mask = txt2img_cli, None, None
            extra += hires_flags(req)
        else:
            kind, image, mask, flags = edit_inputs(req)
            module, extra = (img2img_cli if kind == "img2img" else inpaint_cli), extra + flags
        units, unused_units = read_units(req, model_index(self.controlnet_dirs))    # ControlNet extension's units
        unused += unused_units
        with self.lock:
            with unit_inputs(units, req) as (control_flags, folder):
                try:
                    parser, args = self.request_args(module, req, extra + control_flags)
                    args.net_cache = self.nets
                    draws, steps_each, extras = self.plan(parser, args, kind, image, mask, req)
                except RequestError as err:                 # the units' files named by their request fields
                    raise RequestError(str(err).replace(folder, "alwayson_scripts.controlnet.")) from None
                for key in ("control_image", "adapter_image"):      # the PNG's settings name the fields too
                    setattr(args, key, [p.replace(folder, "sdapi:alwayson_scripts.controlnet.")
                                        for p in getattr(args, key)])
            runs = [argparse.Namespace(**{**vars(args), "seed": seed, "n": 1, "subseed": subseed if strength else None,
                                          "subseed_strength": strength or None})    # the CLI's args for each image
                    for seed, subseed in zip(seeds, subseeds)]
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                with tagged_loras(parser, args, self.pipe, args.prompt) as text:   # merged for this request only
                    untagged = [argparse.Namespace(**{**vars(one), "prompt": text}) for one in runs]
                    results, interrupted = self.run_job([lambda cb, one=one: draws(one, cb) for one in untagged],
                                                        steps_each)
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
        return self.response(req, args, runs, results, extras, interrupted, unused, [str(w.message) for w in caught],
                             seeds, subseeds, strength, batch)

    def plan(self, parser, args, kind: str, image, mask, req: dict):
        """The checks before any model runs, and a function drawing one image of `args` (one seed) -> (image,
        info); the steps each image runs; the `settings` extras of its PNG."""
        pipe = self.pipe
        if kind == "txt2img":
            control = txt2img_cli.check_sizes(parser, args, pipe)
            return (lambda one, cb: txt2img_cli.draw(pipe, one, one.prompt, control, callback=cb),
                    args.steps + (round(args.hires[1] * args.steps) if args.hires else 0), {})
        if pipe.index.image_input in ("kontext", "instruct-pix2pix"):
            raise RequestError(f"this model ({pipe.index.image_input}) edits from pure noise: use python -m "
                               "ldm.img2img; this server runs SDEdit img2img and inpainting")
        size = img2img_cli.input_size(parser, args, pipe)

        def fit(picture, mode):                      # resize_mode 0 stretches to the size, 1 covers and crops
            if field(req, "resize_mode", int, 0) == 0 and picture.size != tuple(size):
                picture = picture.resize(tuple(size), Image.Resampling.LANCZOS)
            return image_tensor(picture, size, mode)

        pixels = fit(image, "RGB")
        if kind == "img2img":
            strength = img2img_cli.STRENGTH if args.strength is None else args.strength
            control = img2img_cli.control_options(parser, args, pipe, size)
            resolve_window(parser, args, pipe, [size], control)
            return (lambda one, cb: pipe.img2img(pixels, [one.prompt], strength=strength, **sampling_options(one),
                                                 **control, callback=cb),
                    round(strength * args.steps), {"strength": strength, "image": args.image})
        masks = (fit(mask, "L") > 0).float()                # white (> 127) is repainted, as ldm.inpaint
        if field(req, "inpainting_mask_invert", int, 0):
            masks = 1 - masks
        inpaint_cli.check_strength(parser, args)
        if args.masked_content == "fill":
            pixels = inpaint_cli.fill_masked(pixels, masks)
        control = inpaint_cli.control_options(parser, args, pipe, size, inpainting=True)
        inpaint_cli.refuse_cfg_pp(parser, args, pipe, control)
        resolve_window(parser, args, pipe, [size], control)
        return (lambda one, cb: pipe.inpaint(pixels, masks.to(pipe.device), [one.prompt], strength=args.strength,
                                             **sampling_options(one), **control, callback=cb),
                round(args.strength * args.steps),
                {"image": args.image, "mask": args.mask, **inpaint_cli.outpaint_settings(args)})

    def response(self, req, args, runs, results, extras, interrupted, unused, warned, seeds, subseeds, strength,
                 batch) -> dict:
        """A1111's {images, parameters, info}: info a JSON string with the seeds and each image's infotext."""
        images, texts = [], []
        for one, (pixels, info) in zip(runs, results):
            run = settings(one, one.prompt, info, **extras)
            texts.append(infotext(run, (pixels.shape[-1], pixels.shape[-2])))
            if field(req, "send_images", bool, True):
                images.append(encode_png(pixels[0], run))
        first = results[0][1] if results else {"guidance": args.guidance, "spacing": args.spacing}
        width, height = (results[0][0].shape[-1], results[0][0].shape[-2]) if results else (None, None)
        sampler = SAMPLER_NAMES.get(args.sampler, args.sampler)
        scheduler = SPACING_NAMES.get(first["spacing"], first["spacing"] or "Automatic")
        guidance = first["guidance"]
        cfg_scale = None if guidance is None else 1 + guidance
        strength_ = extras.get("strength", (getattr(args, "hires", None) or (None, None))[1])   # img2img's, hires'
        info = {"prompt": args.prompt, "all_prompts": [args.prompt] * len(results), "negative_prompt": args.negative,
                "all_negative_prompts": [args.negative] * len(results), "seed": seeds[0], "all_seeds": seeds,
                "subseed": subseeds[0], "all_subseeds": subseeds, "subseed_strength": strength, "width": width,
                "height": height, "sampler_name": sampler, "scheduler": scheduler, "cfg_scale": cfg_scale,
                "steps": args.steps, "batch_size": batch, "clip_skip": args.clip_skip or 1,
                "sd_model_name": self.title, "denoising_strength": strength_,
                "infotexts": texts, "index_of_first_image": 0, "styles": [], "restore_faces": False,
                "interrupted": interrupted, "unused_fields": unused, "warnings": warned}
        parameters = {k: v for k, v in req.items() if k not in ("init_images", "mask")}
        if field(req, "include_init_images", bool, False):
            parameters.update(init_images=req.get("init_images"), mask=req.get("mask"))
        parameters.update(prompt=args.prompt, negative_prompt=args.negative, steps=args.steps, cfg_scale=cfg_scale,
                          sampler_name=sampler, scheduler=scheduler, seed=seeds[0], subseed=subseeds[0],
                          subseed_strength=strength, width=width, height=height)
        return {"images": images, "parameters": parameters, "info": json.dumps(info)}

    def progress(self) -> dict:
        """A1111's progress: the fraction of this job's sampler steps done and a linear time estimate."""
        job = self.job
        fraction = min(1.0, job["done"] / job["total"]) if job["active"] else 0.0
        elapsed = time.time() - job["start"]
        eta = elapsed / fraction - elapsed if job["active"] and fraction > 0 else 0.0
        return {"progress": fraction, "eta_relative": eta, "current_image": None, "textinfo": None,
                "state": {"skipped": False, "interrupted": job["interrupt"], "job": "ldm" if job["active"] else "",
                          "job_count": int(job["active"]), "job_no": 0, "sampling_step": job["done"],
                          "sampling_steps": job["total"] if job["active"] else 0,
                          "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job["start"]))}}

    def interrupt(self) -> dict:
        if self.job["active"]:
            self.job["interrupt"] = True
        return {}

    def refresh_loras(self) -> None:
        """POST /sdapi/v1/refresh-loras: scan the LoRA folders again (A1111 answers null)."""
        with self.lock:
            lora_index(self.lora_dirs, refresh=True)

    def sd_models(self) -> list:
        return [{"title": self.title, "model_name": self.title, "hash": None, "sha256": None,
                 "filename": os.path.abspath(self.model), "config": None}]

ROUTES = {("POST", "/sdapi/v1/txt2img"): lambda s, req: s.generate(req, "txt2img"),
          ("POST", "/sdapi/v1/img2img"): lambda s, req: s.generate(req, "img2img"),
          ("POST", "/sdapi/v1/png-info"): lambda s, req: read_png_info(req),
          ("POST", "/sdapi/v1/options"): Server.set_options,
          ("POST", "/sdapi/v1/interrupt"): lambda s, req: s.interrupt(),
          ("GET", "/sdapi/v1/options"): lambda s, req: s.options(),
          ("GET", "/sdapi/v1/progress"): lambda s, req: s.progress(),
          ("GET", "/sdapi/v1/samplers"): lambda s, req: sampler_list(),
          ("GET", "/sdapi/v1/schedulers"): lambda s, req: scheduler_list(),
          ("GET", "/sdapi/v1/sd-models"): lambda s, req: s.sd_models(),
          ("GET", "/sdapi/v1/loras"): lambda s, req: lora_listing(s.lora_dirs),
          # the A1111 ControlNet extension's routes: the nets in --controlnet-dir, the one preprocessor ("none")
          ("GET", "/controlnet/model_list"): lambda s, req: model_list(model_index(s.controlnet_dirs)),
          ("GET", "/controlnet/module_list"): lambda s, req: module_list(),
          ("GET", "/controlnet/version"): lambda s, req: {"version": API_VERSION},
          ("POST", "/sdapi/v1/refresh-loras"): lambda s, req: s.refresh_loras(),
          # what clients ask for at start-up, answered as we are: hires fix's one latent upscaler (pipe.hires:
          # bilinear, A1111's "Latent"), no separate VAEs, no saved styles
          ("GET", "/sdapi/v1/latent-upscale-modes"): lambda s, req: [{"name": "Latent"}],
          ("GET", "/sdapi/v1/sd-vae"): lambda s, req: [],
          ("GET", "/sdapi/v1/prompt-styles"): lambda s, req: []}


def reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


class Handler(BaseHTTPRequestHandler):
    """Routes a request, answers JSON, logs one line."""
    server_version = "ldm.serve"
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.route("GET")

    def do_POST(self):
        self.route("POST")

    def read_json(self) -> dict:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if not body.strip():
            return {}
        try:
            req = json.loads(body, parse_constant=reject_constant)
        except ValueError as err:
            raise RequestError(f"body: not JSON ({err})") from None
        if not isinstance(req, dict):
            raise RequestError("body: expected a JSON object")
        return req

    def route(self, method: str) -> None:
        start = time.perf_counter()
        path = self.path.split("?", 1)[0].rstrip("/")
        try:
            handler = ROUTES.get((method, path))
            if handler is None:
                known = any(p == path for _, p in ROUTES)
                status, payload = (405, {"error": "Method Not Allowed", "detail": f"{method} {path}"}) if known else \
                    (404, {"error": "Not Found", "detail": f"no route {path}"})
                if method == "POST":
                    self.rfile.read(int(self.headers.get("Content-Length") or 0))
            else:
                req = self.read_json() if method == "POST" else {}
                status, payload = 200, handler(self.server.app, req)
        except RequestError as err:
            status, payload = 422, {"error": "Unprocessable Entity", "detail": str(err)}
        except Exception as err:                        # the server stays up; the client learns what failed
            traceback.print_exc()
            status, payload = 500, {"error": type(err).__name__, "detail": str(err)}
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        detail = f" {payload['detail']}" if status != 200 else ""
        print(f"{self.client_address[0]} {method} {path} {status} {time.perf_counter() - start:.2f} s{detail}",
              file=sys.stderr, flush=True)

    def log_message(self, format, *args):              # one line per request, written by `route`
        pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ldm.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: all)")
    server.add_argument("--port", type=int, default=7860, help="port (default 7860, the A1111 web UI's; 0: any free)")
    server.add_argument("--controlnet-dir", action="append", default=[], metavar="DIR",
                        help="where a request's ControlNet units (alwayson_scripts.controlnet, the A1111 ControlNet "
                             "extension's API) find their model: a ControlNet or T2I-Adapter folder of that name; "
                             "repeatable (default: the model folder's controlnet/ if it has one, and ldm/assets)")
    add_model_args(parser)
    return parser


def make_server(argv: list[str]) -> ThreadingHTTPServer:
    """The model loaded and an HTTP server bound (not yet serving): `.serve_forever()`; its port is
    `.server_address[1]`."""
    app = Server(argv)
    httpd = ThreadingHTTPServer((app.host, app.port), Handler)
    httpd.daemon_threads = True
    httpd.app = app
    return httpd


def main(argv: list[str] | None = None) -> None:
    httpd = make_server(sys.argv[1:] if argv is None else argv)
    host, port = httpd.server_address[:2]
    print(f"serving {httpd.app.model} on http://{host}:{port}/sdapi/v1/ (A1111 API)", file=sys.stderr, flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()


if __name__ == "__main__":
    main()
