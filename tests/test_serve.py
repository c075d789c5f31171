"""`vistune serve`: the real server in a subprocess on a loopback port, spoken to with a real HTTP client.

Correct answers per task in mixed concurrent requests, the error cases, hot load/unload, overload → 503 and a clean
shutdown on SIGTERM. Every load here is a fixed number of requests."""
from __future__ import annotations

import base64
import functools
import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from artifact_factory import make_artifact
from conftest import tiny_backbone
from vistune.artifacts import load_artifact
from vistune.data.images import decode_image_bytes
from vistune.run import transforms_for

SRC = Path(__file__).resolve().parents[1] / "src"
TASKS = {"lora": 1, "vpt-deep": 2, "ssf": 3}  # served from the start (method: seed)
# after draining, uvicorn re-raises the signal that stopped it: the process ends by SIGTERM, as a server should
STOPPED = (0, -signal.SIGTERM)


def _png(seed: int, size: int = 40) -> bytes:
    a = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, tmp: Path, adapters: list[Path], *extra: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(tmp / f"server-{self.port}.log", "w+")
        env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               "HF_HUB_OFFLINE": "1"}
        cmd = [sys.executable, "-m", "vistune", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--threads", "1", "--log-level", "warning", *extra]
        for a in adapters:
            cmd += ["--adapter", str(a)]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.3)
        self.stop()
        raise AssertionError(f"the server did not come up:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    backbone = tiny_backbone("vit")
    served = {name: make_artifact(backbone, name, root / "start" / name, num_classes=3 + seed % 3, seed=seed)
              for name, seed in TASKS.items()}
    hot = make_artifact(backbone, "bias", root / "hot" / "bias", num_classes=4, seed=7)
    outside = make_artifact(backbone, "linear", root / "outside" / "linear", seed=8)
    return root, served, hot, outside


@pytest.fixture(scope="module")
def server(artifacts):
    root, served, _, _ = artifacts
    srv = Server(root, list(served.values()), "--adapter-root", str(root / "hot"), "--max-wait-ms", "20",
                 "--max-images", "4", "--max-body-mb", "0.5", "--max-image-pixels", "100000")
    yield srv
    assert srv.stop() in STOPPED, srv.output()


@functools.lru_cache(maxsize=None)
def _loaded(path: Path):
    return load_artifact(path)


def _expected(path: Path, data: bytes) -> torch.Tensor:
    model, meta = _loaded(path)
    x = transforms_for(meta["preprocessing"])[1](decode_image_bytes(data, "test"))
    with torch.no_grad():
        return model(x[None]).softmax(-1)[0]


def _check(prediction: dict, expected: torch.Tensor, classes: list[str]) -> None:
    top = expected.topk(len(prediction["top_k"]))
    assert [p["class"] for p in prediction["top_k"]] == [classes[i] for i in top.indices.tolist()]
    got = torch.tensor([p["probability"] for p in prediction["top_k"]])
    assert (got - top.values).abs().max() < 1e-4


def _metric(text: str, name: str) -> float:
    return float(re.search(rf"^{re.escape(name)} (\S+)$", text, re.M).group(1))


def test_the_task_list_names_each_tasks_method_classes_and_size(server, artifacts):
    tasks = httpx.get(server.url + "/v1/tasks").json()["tasks"]
    assert [t["name"] for t in tasks] == list(TASKS)
    lora = tasks[0]
    assert lora["method"] == "lora" and lora["classes"] == ["lora-0", "lora-1", "lora-2", "lora-3"]
    assert lora["parameters"]["tuned_params"] > 0 and lora["image_size"] == 32 and lora["runs"] == "shared"


def test_mixed_concurrent_requests_each_get_their_own_tasks_answer(server, artifacts):
    _, served, _, _ = artifacts
    classes = {t["name"]: t["classes"] for t in httpx.get(server.url + "/v1/tasks").json()["tasks"]}
    images = {i: _png(i) for i in range(4)}
    expected = {(task, i): _expected(served[task], data) for task in TASKS for i, data in images.items()}
    before = httpx.get(server.url + "/metrics").text

    def one(job):
        kind, task, i = job
        if kind == "multipart":
            r = httpx.post(f"{server.url}/v1/tasks/{task}/predict", files={"image": ("x.png", images[i])},
                           params={"top_k": 2}, timeout=60)
            return [(task, i, p) for p in r.raise_for_status().json()["predictions"]]
        if kind == "json":
            r = httpx.post(f"{server.url}/v1/tasks/{task}/predict", timeout=60,
                           json={"images": [base64.b64encode(images[i]).decode()], "top_k": 3})
            return [(task, i, p) for p in r.raise_for_status().json()["predictions"]]
        mixed = [(t, (i + k) % 4) for k, t in enumerate(TASKS)]  # one image of every task in one request
        r = httpx.post(f"{server.url}/v1/predict", timeout=60,
                       json={"inputs": [{"task": t, "image": base64.b64encode(images[j]).decode()} for t, j in mixed]})
        preds = r.raise_for_status().json()["predictions"]
        assert [p["task"] for p in preds] == list(TASKS)
        return [(t, j, p) for (t, j), p in zip(mixed, preds)]

    jobs = [(kind, task, i) for i in range(4) for task in TASKS for kind in ("multipart", "json")]
    jobs += [("mixed", None, i) for i in range(4)]
    with ThreadPoolExecutor(8) as pool:
        answers = [a for batch in pool.map(one, jobs) for a in batch]
    assert len(answers) == 4 * 3 * 2 + 4 * 3
    for task, i, prediction in answers:
        _check(prediction, expected[(task, i)], classes[task])
    after = httpx.get(server.url + "/metrics").text
    images_batched = _metric(after, "vistune_batch_size_sum") - _metric(before, "vistune_batch_size_sum")
    batches = _metric(after, "vistune_batch_size_count") - _metric(before, "vistune_batch_size_count")
    assert images_batched == len(answers) and batches < len(answers)  # images of several requests shared passes
    assert 'vistune_request_latency_seconds{quantile="0.99"}' in after and "vistune_queue_depth 0.0" in after


def test_multipart_files_named_by_task_are_one_mixed_request(server, artifacts):
    _, served, _, _ = artifacts
    files = [("ssf", ("a.png", _png(11))), ("lora", ("b.png", _png(12)))]
    preds = httpx.post(server.url + "/v1/predict", files=files, timeout=60).raise_for_status().json()["predictions"]
    classes = {t["name"]: t["classes"] for t in httpx.get(server.url + "/v1/tasks").json()["tasks"]}
    assert [p["task"] for p in preds] == ["ssf", "lora"]
    _check(preds[0], _expected(served["ssf"], _png(11)), classes["ssf"])
    _check(preds[1], _expected(served["lora"], _png(12)), classes["lora"])


@pytest.mark.parametrize("case,status,message", [
    ("not-an-image", 400, "cannot read image"),
    ("bomb", 413, "too large to decode"),
    ("unknown-task", 404, "unknown task 'nope'"),
    ("too-many-images", 413, "5 images in one request, over the limit of 4"),
    ("body-too-large", 413, "over the limit of"),
    ("bad-base64", 400, "not valid base64"),
    ("no-image", 400, "holds no image"),
    ("content-type", 415, "unsupported content type"),
    ("untasked", 400, "every input must name its task"),
])
def test_bad_input_gets_a_4xx_with_a_json_error_saying_what_is_wrong(server, case, status, message):
    url = server.url + "/v1/tasks/lora/predict"
    big = io.BytesIO()
    Image.new("L", (400, 400)).save(big, format="PNG")  # 160,000 pixels > --max-image-pixels 100000
    request = {
        "not-an-image": dict(files={"image": ("x.png", b"GIF89a but not really")}),
        "bomb": dict(files={"image": ("big.png", big.getvalue())}),
        "unknown-task": dict(url=server.url + "/v1/tasks/nope/predict", files={"image": ("x.png", _png(0))}),
        "too-many-images": dict(files=[("image", (f"{i}.png", _png(i))) for i in range(5)]),
        "body-too-large": dict(content=b"x" * 600_000, headers={"content-type": "application/json"}),
        "bad-base64": dict(json={"image": "not base64!"}),
        "no-image": dict(json={}),
        "content-type": dict(content=b"hello", headers={"content-type": "text/plain"}),
        "untasked": dict(url=server.url + "/v1/predict", json={"images": [base64.b64encode(_png(0)).decode()]}),
    }[case]
    r = httpx.post(request.pop("url", url), timeout=60, **request)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["what"]


def test_artifacts_are_loaded_and_unloaded_without_a_restart(server, artifacts):
    _, _, hot, outside = artifacts
    image = _png(21)
    refused = httpx.post(server.url + "/v1/tasks", json={"path": str(outside)})
    assert refused.status_code == 403 and "not under an --adapter-root" in refused.json()["error"]["what"]
    sneaky = httpx.post(server.url + "/v1/tasks", json={"path": str(hot.parent / ".." / "outside" / "linear")})
    assert sneaky.status_code == 403
    r = httpx.post(server.url + "/v1/tasks", json={"path": str(hot)}, timeout=120)
    assert r.status_code == 201, r.text
    assert r.json()["task"]["name"] == "bias" and r.json()["task"]["num_classes"] == 4
    assert httpx.post(server.url + "/v1/tasks", json={"path": str(hot)}).status_code == 409
    pred = httpx.post(server.url + "/v1/tasks/bias/predict", files={"image": ("x.png", image)}, timeout=60)
    _check(pred.json()["predictions"][0], _expected(hot, image), [f"bias-{k}" for k in range(4)])
    assert httpx.delete(server.url + "/v1/tasks/bias").json() == {"removed": "bias"}
    gone = httpx.post(server.url + "/v1/tasks/bias/predict", files={"image": ("x.png", image)})
    assert gone.status_code == 404
    assert [t["name"] for t in httpx.get(server.url + "/v1/tasks").json()["tasks"]] == list(TASKS)


def test_a_full_queue_answers_503_and_sigterm_drains_the_requests_in_flight(artifacts):
    root, served, _, _ = artifacts
    # batches wait 3 s for more images, so the first two requests hold the two places of the queue meanwhile
    srv = Server(root, [served["lora"]], "--max-queue", "2", "--max-images", "2", "--max-batch", "8",
                 "--max-wait-ms", "3000")
    try:
        def post(i):
            return httpx.post(srv.url + "/v1/tasks/lora/predict", files={"image": ("x.png", _png(i))}, timeout=60)

        with ThreadPoolExecutor(2) as pool:
            held = [pool.submit(post, i) for i in range(2)]
            _wait_for_queue(srv, 2)
            overflow = [post(i) for i in range(2, 4)]
            assert [r.status_code for r in overflow] == [503, 503]
            assert all(r.headers["retry-after"] == "1" and "at capacity" in r.json()["error"]["what"]
                       for r in overflow)
            assert [f.result().status_code for f in held] == [200, 200]

            in_flight = [pool.submit(post, i) for i in range(4, 6)]
            _wait_for_queue(srv, 2)
            srv.proc.send_signal(signal.SIGTERM)  # while both wait for their batch
            assert [f.result().status_code for f in in_flight] == [200, 200]
        assert srv.proc.wait(60) in STOPPED, srv.output()
        assert "answered every request in flight" in srv.output()
    finally:
        srv.stop()


def _wait_for_queue(srv: Server, depth: int) -> None:
    deadline = time.monotonic() + 30
    while httpx.get(srv.url + "/healthz").json()["queue_depth"] < depth:
        assert time.monotonic() < deadline, "the requests never reached the queue"
        time.sleep(0.02)
