"""Runs the KFP launcher step of examples/kfp (``launch_pytorchjob``'s Python function, the
code a pipeline pod runs) against a stand-in Kubernetes API: an HTTP server on loopback that
serves PyTorchJobs (create, get, delete) and runs each created job with
``ferrun-operator local``, reporting its conditions as the training-operator would. The step
uses the real training SDK (kubeflow-training) through a kubeconfig that points at it.

Usage: python kfp_launcher_step.py JOB.json NAMESPACE. Prints the step's return value on a
line ``result: …`` and the API requests it made on a line ``requests: …``; exits 1 when the
step raised (its message on stderr)."""

import json
import os
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

jobs = {}  # (namespace, name) -> {"job": dict, "run": Popen}
requests = []
lock = threading.Lock()
scratch = tempfile.mkdtemp(prefix="kube-api-")


def status(entry):
    run = entry["run"]
    code = run.poll()
    conditions = [{"type": "Created", "status": "True", "reason": "PyTorchJobCreated"}]
    if code is None:
        conditions.append({"type": "Running", "status": "True", "reason": "PyTorchJobRunning"})
    elif code == 0:
        conditions.append({"type": "Succeeded", "status": "True", "reason": "PyTorchJobSucceeded",
                           "message": "PyTorchJob is successfully completed."})
    else:
        conditions.append({"type": "Failed", "status": "True", "reason": "PyTorchJobFailed",
                           "message": f"ferrun-operator local exited with code {code}"})
    return {"conditions": conditions, "replicaStatuses": {}}


class Api(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def reply(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def route(self):
        parts = self.path.split("?")[0].strip("/").split("/")
        # apis/kubeflow.org/v1/namespaces/<ns>/pytorchjobs[/<name>]
        if parts[:3] != ["apis", "kubeflow.org", "v1"] or len(parts) < 6 or parts[3] != "namespaces" \
                or parts[5] != "pytorchjobs":
            return None
        return parts[4], (parts[6] if len(parts) > 6 else None)

    def do_POST(self):
        where = self.route()
        with lock:
            requests.append(f"POST {self.path}")
        if not where:
            return self.reply(404, {"kind": "Status", "code": 404})
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        namespace, _ = where
        name = body["metadata"]["name"]
        path = os.path.join(scratch, f"{namespace}-{name}.json")
        with open(path, "w") as f:
            json.dump(body, f)
        run = subprocess.Popen(["ferrun-operator", "local", "--timeout", "240", path])
        with lock:
            jobs[(namespace, name)] = {"job": body, "run": run}
        self.reply(201, body)

    def do_GET(self):
        where = self.route()
        with lock:
            requests.append(f"GET {self.path}")
            entry = jobs.get(where) if where else None
        if not entry:
            return self.reply(404, {"kind": "Status", "code": 404})
        self.reply(200, dict(entry["job"], status=status(entry)))

    def do_DELETE(self):
        where = self.route()
        with lock:
            requests.append(f"DELETE {self.path}")
            entry = jobs.pop(where, None) if where else None
        if not entry:
            return self.reply(404, {"kind": "Status", "code": 404})
        if entry["run"].poll() is None:
            entry["run"].terminate()
        self.reply(200, {"kind": "Status", "status": "Success"})


def main():
    job_file, namespace = sys.argv[1], sys.argv[2]
    server = ThreadingHTTPServer(("127.0.0.1", 0), Api)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    kubeconfig = os.path.join(scratch, "kubeconfig")
    with open(kubeconfig, "w") as f:
        json.dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "local",
            "clusters": [{"name": "local", "cluster": {"server": f"http://127.0.0.1:{server.server_port}"}}],
            "users": [{"name": "local", "user": {"token": "local"}}],
            "contexts": [{"name": "local", "context": {"cluster": "local", "user": "local"}}],
        }, f)
    # Read by the kubernetes client when it is first imported (inside the step).
    os.environ["KUBECONFIG"] = kubeconfig
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "../../examples/kfp"))
    import ferrun_pipelines as p

    with open(job_file) as f:
        job = json.load(f)
    try:
        result = p.launch_pytorchjob.python_func(
            job=job, namespace=namespace, wait_timeout_s=240, delete_after=True
        )
        code = 0
    except Exception as e:
        print(f"the step failed: {e}", file=sys.stderr)
        result, code = None, 1
    print(f"result: {result}", flush=True)
    with lock:
        print("requests: " + json.dumps(requests), flush=True)
    server.shutdown()
    sys.exit(code)


if __name__ == "__main__":
    main()
