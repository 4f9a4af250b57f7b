#!/usr/bin/env python3
"""A webhook receiver for trying Aegis Webhooks locally: prints every delivery and
checks its X-Aegis-Signature the way the webhook documentation describes.

    python3 examples/receiver.py 9000 your-webhook-secret
"""
import hashlib
import hmac
import http.server
import json
import sys

PORT = int(sys.argv[1]) if len(sys.argv) > 1 else 9000
SECRET = sys.argv[2].encode() if len(sys.argv) > 2 else b"your-webhook-secret"


class Receiver(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        expected = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
        valid = hmac.compare_digest(expected, self.headers.get("X-Aegis-Signature", ""))
        print(
            f"{self.headers.get('X-Aegis-Event')} delivery={self.headers.get('X-Aegis-Delivery')} "
            f"attempt={self.headers.get('X-Aegis-Attempt')} signature={'valid' if valid else 'INVALID'}"
        )
        print(json.dumps(json.loads(body), indent=2), flush=True)
        self.send_response(200 if valid else 401)
        self.end_headers()

    def log_message(self, *args):
        pass


print(f"listening on http://127.0.0.1:{PORT}/", flush=True)
http.server.HTTPServer(("127.0.0.1", PORT), Receiver).serve_forever()
