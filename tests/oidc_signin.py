"""Team mode signed in through OIDC end to end: Streamlit's own `st.login` against a local
OpenID Connect provider, in Debian's Chromium. Run by tests/test_team_oidc.py in a process of its
own (Playwright starts once per process); prints "signed in as ..." and exits 0 when every
step held.

The provider is the smallest one Authlib accepts: discovery, an authorization endpoint that
approves at once (as a provider does for a user already signed in there), a token endpoint that
returns an RS256 ID token with the request's nonce, and its key set. Everything on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

from browser import AppPage, chromium, free_port, running_app
from joserfc import jwt
from joserfc.jwk import RSAKey

ROOT = Path(__file__).resolve().parent.parent
CLIENT_ID, CLIENT_SECRET = "moeviz-test", "client-secret"
EMAIL = "researcher@lab.example"


class Provider:
    def __init__(self):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.key = RSAKey.generate_key(2048, parameters={"kid": "test-key"})
        self.codes: dict[str, str] = {}  # code -> nonce
        self.requests: list[str] = []
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, status: int, body: dict | None = None, location: str | None = None):
                self.send_response(status)
                if location:
                    self.send_header("Location", location)
                data = json.dumps(body or {}).encode()
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                url = urlsplit(self.path)
                provider.requests.append(url.path)
                if url.path == "/.well-known/openid-configuration":
                    return self.reply(200, provider.metadata())
                if url.path == "/jwks":
                    return self.reply(200, {"keys": [provider.key.as_dict(private=False)]})
                if url.path == "/authorize":
                    query = {k: v[0] for k, v in parse_qs(url.query).items()}
                    code = secrets.token_urlsafe(8)
                    provider.codes[code] = query.get("nonce", "")
                    target = query["redirect_uri"] + "?" + urlencode({"code": code, "state": query["state"]})
                    return self.reply(302, location=target)
                return self.reply(404)

            def do_POST(self):
                url = urlsplit(self.path)
                provider.requests.append(url.path)
                form = {k: v[0] for k, v in parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode()).items()}
                if url.path != "/token" or form.get("code") not in provider.codes:
                    return self.reply(400, {"error": "invalid_grant"})
                return self.reply(200, provider.tokens(provider.codes.pop(form["code"])))

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)

    def metadata(self) -> dict:
        return {"issuer": self.base, "authorization_endpoint": f"{self.base}/authorize",
                "token_endpoint": f"{self.base}/token", "jwks_uri": f"{self.base}/jwks",
                "response_types_supported": ["code"], "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"], "scopes_supported": ["openid", "email"],
                "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"]}

    def tokens(self, nonce: str) -> dict:
        now = int(time.time())
        claims = {"iss": self.base, "sub": "user-1", "aud": CLIENT_ID, "iat": now, "exp": now + 600, "nonce": nonce,
                  "email": EMAIL, "email_verified": True, "name": "A Researcher"}
        id_token = jwt.encode({"alg": "RS256", "kid": "test-key"}, claims, self.key)
        return {"access_token": secrets.token_urlsafe(16), "token_type": "Bearer", "expires_in": 600, "id_token": id_token}

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()


def main() -> int:
    app_port = free_port()
    with tempfile.TemporaryDirectory() as scratch, Provider() as provider:
        scratch = Path(scratch)
        secrets_file = scratch / "secrets.toml"
        secrets_file.write_text(
            "[auth]\n"
            f'redirect_uri = "http://127.0.0.1:{app_port}/oauth2callback"\n'
            f'cookie_secret = "{secrets.token_urlsafe(24)}"\n'
            f'client_id = "{CLIENT_ID}"\nclient_secret = "{CLIENT_SECRET}"\n'
            f'server_metadata_url = "{provider.base}/.well-known/openid-configuration"\n')
        env = os.environ | {"MOEVIZ_TEAM": "1", "MOEVIZ_MODELS": f"bundled={ROOT / 'assets' / 'model'}",
                            "STREAMLIT_SECRETS_FILES": str(secrets_file)}
        env.pop("MOEVIZ_ACCESS_TOKEN", None)
        with running_app(scratch / "server.log", env, port=app_port) as url, chromium(scratch / "profile") as browser:
            tab = AppPage(browser.new_page(), url).open()
            if tab.page.locator('[data-testid="stSidebar"] .st-key-model_name').count():
                print("the app opened without sign-in")
                return 1
            if tab.page.locator(".st-key-team_access_token").count():
                print("the app asked for an access token although OIDC is configured")
                return 1
            tab.page.get_by_role("button", name="Sign in").click()
            tab.page.wait_for_url(f"{url}/**", timeout=60_000)
            tab.page.locator(".st-key-model_name").wait_for(timeout=60_000)
            tab.page.get_by_text(re.compile(r"^[\d,]+ tokens? · ")).first.wait_for(timeout=120_000)
            for step in ("/.well-known/openid-configuration", "/authorize", "/token", "/jwks"):
                if step not in provider.requests:
                    print(f"the provider never saw {step}: {provider.requests}")
                    return 1
            shown = tab.page.locator('[data-testid="stSidebar"]').inner_text()
            if EMAIL not in shown:
                print(f"the sidebar does not name the signed-in user: {shown[:400]!r}")
                return 1
            counts = tab.token_counts()
            if not counts:
                print("signed in, but the Analyse page shows no trace")
                return 1
            tab.page.locator('[data-testid="stSidebar"]').get_by_role("button", name="Sign out").click()
            tab.page.get_by_role("button", name="Sign in").wait_for(timeout=60_000)
            if tab.page.locator(".st-key-model_name").count():
                print("signed out, but the pages are still shown")
                return 1
            print(f"signed in as {EMAIL}; the Analyse page traced {counts[0]} tokens; signed out")
    return 0


if __name__ == "__main__":
    sys.exit(main())
