"""The team-mode sign-in gate that app.py puts in front of every page.

With an `[auth]` section in `.streamlit/secrets.toml`, sign-in is Streamlit's own OIDC
(`st.login`, which needs Authlib); otherwise a shared access token ($MOEVIZ_ACCESS_TOKEN), typed
once per browser session and compared in constant time. The token is never shown, logged or kept
in the session: only the fact that it matched is.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Mapping

import streamlit as st

from moeviz.team import TeamSettings, TeamSettingsError, read_settings

SIGNED_IN = "team_signed_in"
TOKEN_FIELD = "team_access_token"
WRONG_TOKEN_DELAY = 1.0  # seconds: slows guessing without bothering a person who mistyped


def gate() -> bool:
    """True when the pages may run: single-user mode, or team mode with valid settings and a
    signed-in session. Otherwise the page shows why (or the sign-in form), and False."""
    try:
        settings = read_settings()
    except TeamSettingsError as error:
        st.error(f"This moeviz server's team settings cannot be read: {error}")
        return False
    for problem in settings.problems():
        st.error(problem)
    return not settings.problems() and signed_in(settings)


def signed_in(settings: TeamSettings) -> bool:
    """True when this session may see the pages; otherwise the sign-in form is on the page."""
    if not settings.enabled:
        return True
    provider = oidc_provider()
    if provider is not False:
        return _oidc_signed_in(provider)
    if settings.access_token is None:
        st.error("Team mode needs a way to sign in, and none is set: give the server $MOEVIZ_ACCESS_TOKEN, "
                 "or an [auth] section in .streamlit/secrets.toml (see the README, \"Serving moeviz to a team\").")
        return False
    return st.session_state.get(SIGNED_IN, False) or _token_form(settings.access_token)


def oidc_provider() -> str | None | bool:
    """The OIDC provider to sign in with: None for the `[auth]` section's own, a name for its
    first named provider; False when secrets.toml configures none."""
    if not st.secrets.load_if_toml_exists() or "auth" not in st.secrets:
        return False
    named = [name for name, value in st.secrets["auth"].items() if isinstance(value, Mapping)]
    return named[0] if named else None


def _oidc_signed_in(provider: str | None) -> bool:
    if st.user.is_logged_in:
        who = st.user.get("email") or st.user.get("name") or "a signed-in user"
        st.sidebar.text(f"Signed in as {who}")  # plain text: a name cannot format the page
        st.sidebar.button("Sign out", on_click=st.logout, key="team_oidc_logout")
        return True
    st.title("moeviz")
    st.write("This moeviz server is shared by a team: sign in to use it.")
    st.button("Sign in", on_click=st.login, args=(provider,) if provider else (), key="team_oidc_login")
    return False


def _token_form(token: str) -> bool:
    st.title("moeviz")
    with st.form("team_sign_in"):
        st.write("This moeviz server is shared by a team: type the access token you were given.")
        st.text_input("Access token", type="password", key=TOKEN_FIELD)
        submitted = st.form_submit_button("Sign in")
    if not submitted:
        return False
    given = st.session_state.pop(TOKEN_FIELD, "")
    if hmac.compare_digest(given.encode(), token.encode()):
        st.session_state[SIGNED_IN] = True
        st.rerun()
    time.sleep(WRONG_TOKEN_DELAY)
    st.error("That access token is not the one this server expects. Check it with whoever runs the server.")
    return False
