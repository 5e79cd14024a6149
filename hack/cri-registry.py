#!/usr/bin/env python3
"""A read-only OCI distribution registry on loopback for ms2m's CRI tests.

containerd's CRI restore pulls the checkpoint's base image by digest
(NAME@sha256:...) even when the image is already local, and this machine has
no registry to pull from. This serves the OCI image layouts under ROOT
(ROOT/<repository>/index.json, ROOT/<repository>/blobs/sha256/<hex>) as
http://LISTEN/v2/<repository>/...: manifests by tag (the index's
org.opencontainers.image.ref.name) or digest, and blobs. GET and HEAD only;
containerd reaches 127.0.0.1 over plain HTTP without configuration.

    hack/cri-registry.py --listen 127.0.0.1:5111 --root /opt/ms2m/cri-registry
"""
import argparse
import json
import os
import re
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PATH_RE = re.compile(r"^/v2/(?P<name>[a-z0-9._/-]+)/(?P<kind>manifests|blobs)/(?P<ref>[A-Za-z0-9._:-]+)$")
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


class Handler(BaseHTTPRequestHandler):
    root = "."
    server_version = "ms2m-cri-registry/1"

    def log_message(self, fmt, *args):
        sys.stderr.write("%s %s\n" % (self.log_date_time_string(), fmt % args))

    def reply(self, code, body=b"", ctype="application/json", digest=None):
        self.send_response(code)
        self.send_header("Docker-Distribution-API-Version", "registry/2.0")
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        if digest:
            self.send_header("Docker-Content-Digest", digest)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def not_found(self, code, message):
        body = json.dumps({"errors": [{"code": code, "message": message}]}).encode()
        self.reply(404, body)

    def blob(self, name, digest):
        if not DIGEST_RE.match(digest):
            return None
        path = os.path.join(self.root, name, "blobs", "sha256", digest[len("sha256:"):])
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError:
            return None

    def manifest_digest(self, name, ref):
        if DIGEST_RE.match(ref):
            return ref
        try:
            with open(os.path.join(self.root, name, "index.json")) as f:
                index = json.load(f)
        except (OSError, ValueError):
            return None
        for m in index.get("manifests", []):
            if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == ref:
                return m.get("digest")
        return None

    def do_GET(self):
        if self.path in ("/v2", "/v2/"):
            return self.reply(200, b"{}")
        m = PATH_RE.match(self.path)
        if not m or ".." in m.group("name"):
            return self.not_found("NAME_UNKNOWN", "no such path")
        name, kind, ref = m.group("name"), m.group("kind"), m.group("ref")
        if kind == "blobs":
            data = self.blob(name, ref)
            if data is None:
                return self.not_found("BLOB_UNKNOWN", "blob unknown: %s" % ref)
            return self.reply(200, data, "application/octet-stream", ref)
        digest = self.manifest_digest(name, ref)
        data = self.blob(name, digest) if digest else None
        if data is None:
            return self.not_found("MANIFEST_UNKNOWN", "manifest unknown: %s:%s" % (name, ref))
        try:
            ctype = json.loads(data).get("mediaType", "application/vnd.oci.image.manifest.v1+json")
        except ValueError:
            return self.not_found("MANIFEST_INVALID", "not a manifest: %s" % digest)
        return self.reply(200, data, ctype, digest)

    do_HEAD = do_GET


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--listen", default="127.0.0.1:5111")
    p.add_argument("--root", required=True)
    a = p.parse_args()
    host, port = a.listen.rsplit(":", 1)
    Handler.root = a.root
    ThreadingHTTPServer.daemon_threads = True
    srv = ThreadingHTTPServer((host, int(port)), Handler)
    sys.stderr.write("serving %s on http://%s/v2/\n" % (a.root, a.listen))
    srv.serve_forever()


if __name__ == "__main__":
    main()
