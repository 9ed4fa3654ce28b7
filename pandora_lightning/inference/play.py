"""`play`: steer a checkpoint round by round, in a local web page or in the terminal.

The page is plain HTML + JavaScript served by the standard library's HTTP server (no web
framework): pick or upload a start image, type an action, watch the clip, see the whole episode,
fork from any round (a counterfactual branch that shares everything before it), download the mp4.
Its JSON API (below) is what the page calls and what the tests drive:

    GET  /api/info                      model, frame size, example start images and actions
    POST /api/sessions                  {"image": data URL | null, "start": index | null, "seed": int}
    POST /api/sessions/ID/step          {"action": text}
    POST /api/sessions/ID/fork          {"round": k}  (0 = from the start frames)
    POST /api/sessions/ID/close         frees the cache; the episode stays readable
    GET  /api/sessions/ID/video.mp4     the episode so far
Every error is HTTP 400 with {"error": one line}.
"""
from __future__ import annotations

import base64
import io
import json
import re
import sys
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image

from pandora_lightning.data.frames import from_numpy, to_numpy
from pandora_lightning.data.video import encode_mp4, upscale
from pandora_lightning.errors import PandoraError
from pandora_lightning.inference.generate import fit_start_image, open_image, write_episode
from pandora_lightning.inference.page import PAGE
from pandora_lightning.inference.session import ActionCheck, Session
from pandora_lightning.models.world_model import WorldModel
from pandora_lightning.training.precision import autocast

MAX_BODY = 8 * 2**20  # an uploaded image, base64


def png_data_url(frame: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@dataclass
class Branch:
    session: Session
    parent: int | None
    at_round: int  # the parent's round this branch starts after


class Play:
    """The sessions of one `play` run and what the API does with them (HTTP-free, so it is easy to test)."""

    def __init__(self, model: WorldModel, starts: list[np.ndarray] = (), examples: list[str] = (),
                 check_action: ActionCheck | None = None, seed: int = 0, name: str = ""):
        self.model, self.starts, self.examples = model, list(starts), list(examples)
        self.check_action, self.seed, self.name = check_action, seed, name
        self.size = tuple(model.cfg.generator.size)
        self.branches: dict[int, Branch] = {}
        self.lock = threading.Lock()  # one model call at a time

    def _autocast(self):
        """The precision the model was loaded in (a `*-mixed` one runs under autocast, as generate does)."""
        return autocast(getattr(self.model, "precision", "32-true"), next(self.model.parameters()).device)

    def info(self) -> dict:
        return {
            "checkpoint": self.name, "height": self.size[0], "width": self.size[1], "cond_frames": self.model.cond_frames,
            "new_frames": self.model.new_frames, "history_rounds": self.model.history_rounds,
            "starts": [png_data_url(s) for s in self.starts], "examples": self.examples,
        }

    def describe(self, key: int, note: str = "") -> dict:
        b = self.branches[key]
        s, n = b.session, self.model.cond_frames
        frames = to_numpy(s.frames)
        f = self.model.new_frames
        rounds = [{"action": a, "frames": [png_data_url(x) for x in frames[i * f : i * f + n + f]]} for i, a in enumerate(s.actions)]
        return {"id": key, "parent": b.parent, "at_round": b.at_round, "closed": s.closed, "note": note,
                "start": png_data_url(frames[n - 1]), "rounds": rounds,
                "branches": [{"id": k, "parent": v.parent, "at_round": v.at_round, "rounds": v.session.rounds}
                             for k, v in self.branches.items()]}

    def _branch(self, key) -> Branch:
        try:
            return self.branches[int(key)]
        except (KeyError, ValueError):
            raise PandoraError(f"there is no session {key}; start one first") from None

    def start(self, body: dict) -> dict:
        note = ""
        if body.get("image"):
            data = re.sub(r"^data:[^,]*,", "", str(body["image"]))
            try:
                raw = base64.b64decode(data, validate=False)
            except ValueError:
                raise PandoraError("the uploaded start image is not base64 data") from None
            frame, note = fit_start_image(open_image(raw, "the uploaded start image"), self.size, resize=True,
                                          name="the uploaded start image")
        elif body.get("start") is not None:
            index = int(body["start"])
            if not 0 <= index < len(self.starts):
                raise PandoraError(f"there is no example start image {index}; pick one of 0..{len(self.starts) - 1}")
            frame = self.starts[index]
        else:
            raise PandoraError("pick an example start image or upload one")
        seed = int(body.get("seed", self.seed))
        session = Session(self.model, from_numpy(np.array(frame)), seed=seed, check_action=self.check_action)
        key = len(self.branches)
        self.branches[key] = Branch(session, None, 0)
        return self.describe(key, note and f"start image {note}")

    def step(self, key, body: dict) -> dict:
        branch = self._branch(key)
        with self.lock, self._autocast():
            branch.session.step(str(body.get("action", "")))
        return self.describe(int(key))

    def fork(self, key, body: dict) -> dict:
        branch = self._branch(key)
        at = body.get("round")
        child = branch.session.fork(None if at is None else int(at))
        new = len(self.branches)
        self.branches[new] = Branch(child, int(key), child.rounds)
        return self.describe(new)

    def close(self, key) -> dict:
        self._branch(key).session.close()
        return self.describe(int(key))

    def video(self, key) -> bytes:
        return encode_mp4(upscale(to_numpy(self._branch(key).session.frames), 4), fps=8)


def handler_for(play: Play):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet: the page is the log
            pass

        def _send(self, status: int, body: bytes, kind: str, extra: dict | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, data: dict) -> None:
            self._send(status, json.dumps(data).encode(), "application/json")

        def _route(self, method: str) -> None:
            path = self.path.split("?")[0].rstrip("/") or "/"
            try:
                if method == "GET" and path == "/":
                    return self._send(200, PAGE.encode(), "text/html; charset=utf-8")
                if method == "GET" and path == "/api/info":
                    return self._json(200, play.info())
                m = re.fullmatch(r"/api/sessions/(\d+)/video\.mp4", path)
                if method == "GET" and m:
                    return self._send(200, play.video(m[1]), "video/mp4",
                                      {"Content-Disposition": f'attachment; filename="episode-{m[1]}.mp4"'})
                if method != "POST":
                    return self._json(404, {"error": f"no such page: {path}"})
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY:
                    raise PandoraError(f"the request is {length} bytes; at most {MAX_BODY} are accepted (a smaller image?)")
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                except json.JSONDecodeError:
                    raise PandoraError("the request body is not JSON") from None
                if path == "/api/sessions":
                    return self._json(200, play.start(body))
                m = re.fullmatch(r"/api/sessions/(\d+)/(step|fork|close)", path)
                if not m:
                    return self._json(404, {"error": f"no such action: {path}"})
                out = {"step": lambda: play.step(m[1], body), "fork": lambda: play.fork(m[1], body),
                       "close": lambda: play.close(m[1])}[m[2]]()
                return self._json(200, out)
            except (PandoraError, ValueError, TypeError) as err:  # PandoraError is the usual one
                return self._json(400, {"error": str(err)})

        def do_GET(self):
            self._route("GET")

        def do_POST(self):
            self._route("POST")

    return Handler


def serve(play: Play, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """A server bound to host:port (port 0: any free one); call serve_forever() on it."""
    return ThreadingHTTPServer((host, port), handler_for(play))


def ansi_frame(frame: np.ndarray) -> str:
    """(H, W, 3) uint8 -> the frame in a truecolour terminal, two pixel rows per text row."""
    rows = []
    for y in range(0, frame.shape[0] - 1, 2):
        top, bottom = frame[y], frame[y + 1]
        rows.append("".join(f"\x1b[38;2;{a[0]};{a[1]};{a[2]}m\x1b[48;2;{b[0]};{b[1]};{b[2]}m\u2580" for a, b in zip(top, bottom)) + "\x1b[0m")
    return "\n".join(rows)


TERMINAL_HELP = """type an action and press enter; or
  :fork K      branch from round K (0 = the start) and continue there
  :branches    list the branches          :switch I   continue branch I
  :save [DIR]  write rollout.mp4, rollout.png, actions.txt      :quit"""


def terminal(play: Play, start: np.ndarray, out_dir: Path, lines=None, write=print, color: bool = True) -> None:
    """The terminal mode: read actions (and : commands) line by line; show each round's last frame."""
    lines = lines if lines is not None else sys.stdin
    play.starts = [start]
    current = play.start({"start": 0})["id"]
    write(TERMINAL_HELP)
    for line in lines:
        text = line.strip()
        if not text:
            continue
        try:
            cmd, _, arg = text.partition(" ")
            if cmd == ":quit":
                break
            if cmd == ":fork":
                current = play.fork(current, {"round": int(arg) if arg else None})["id"]
                write(f"branch {current}: from round {play.branches[current].at_round}")
            elif cmd == ":branches":
                for k, b in play.branches.items():
                    write(f"{'*' if k == current else ' '} {k}: {b.session.rounds} rounds, from branch {b.parent} round {b.at_round}: "
                          + " | ".join(b.session.actions))
            elif cmd == ":switch":
                play._branch(arg)
                current = int(arg)
            elif cmd == ":save":
                s = play.branches[current].session
                paths = write_episode(Path(arg) if arg else out_dir, to_numpy(s.frames), s.actions, s.model.cond_frames, s.model.new_frames)
                write(f"wrote {paths[0]} and {paths[1]}")
            elif cmd.startswith(":"):
                write(f"unknown command {cmd}\n{TERMINAL_HELP}")
            else:
                s = play.branches[current].session
                play.step(current, {"action": text})
                write(f"round {s.rounds}: {s.actions[-1]}")
                if color:
                    write(ansi_frame(to_numpy(s.frames[-1])))
        except (PandoraError, ValueError) as err:
            write(f"error: {err}")
