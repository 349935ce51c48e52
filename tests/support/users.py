"""Users files for listeners with `auth: {mode: htpasswd}`, in the format `htpasswd -B`
writes (bcrypt, `$2y$`), at bcrypt's lowest cost so that tests log in fast."""

from __future__ import annotations

from pathlib import Path

MIN_ROUNDS = 4  # bcrypt's lowest cost: a check takes about a millisecond


def users_file(path: Path, users: dict[str, str], rounds: int = MIN_ROUNDS) -> Path:
    """Write `{user: password}` to `path` as `htpasswd -B` would; returns `path`."""
    import bcrypt  # in the `test` extra; imported here so that collection never needs it

    lines = []
    for user, password in users.items():
        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds)).decode()
        lines.append(f"{user}:$2y${hashed[4:]}\n")  # bcrypt writes $2b$, htpasswd $2y$
    path.write_text("".join(lines))
    return path
