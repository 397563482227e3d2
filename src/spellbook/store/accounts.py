"""Users, API tokens and the credits ledger.

Tokens are random (`sb_` + 32 url-safe bytes), shown once and stored as their sha256. Passwords are
scrypt-hashed. A balance changes only through a ledger row written in the same transaction as the cached
`users.balance`, which SQLite keeps at or above zero (CHECK constraint), so concurrent debits can never
overdraw an account: the conditional UPDATE either takes the credits or takes nothing.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from spellbook.errors import Conflict, InsufficientCredits, NotFound, UserError
from spellbook.store.db import Database

USER_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,31}$")
TOKEN_PREFIX = "sb_"


@dataclass(frozen=True)
class User:
    id: int
    name: str
    role: str
    balance: int

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def _user(row) -> User:
    return User(row["id"], row["name"], row["role"], row["balance"])


def check_user_name(name: str) -> str:
    if not USER_NAME.match(name or ""):
        raise UserError(
            f"user name {name!r} is not allowed: use 1-32 lower-case letters, digits, '_', '.' or '-', "
            "starting with a letter or digit",
            field="name",
        )
    return name


class Accounts:
    def __init__(self, db: Database):
        self.db = db

    # ------------------------------------------------------------------------------------------ users
    def add_user(self, name: str, *, admin: bool = False, password: str | None = None) -> User:
        check_user_name(name)
        with self.db.transaction() as conn:
            if conn.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone():
                raise Conflict(f"user {name!r} already exists", field="name")
            conn.execute(
                "INSERT INTO users (name, role, password_hash) VALUES (?, ?, ?)",
                (name, "admin" if admin else "user", hash_password(password) if password else None),
            )
        return self.user(name)

    def user(self, name_or_id: str | int) -> User:
        column = "id" if isinstance(name_or_id, int) else "name"
        row = self.db.execute(f"SELECT * FROM users WHERE {column} = ?", (name_or_id,)).fetchone()
        if row is None:
            raise NotFound(f"no user {name_or_id!r}; create one with `spellbook users add NAME`", field="user")
        return _user(row)

    def users(self) -> list[User]:
        return [_user(r) for r in self.db.execute("SELECT * FROM users ORDER BY id")]

    def has_admin(self) -> bool:
        return self.db.execute("SELECT 1 FROM users WHERE role = 'admin'").fetchone() is not None

    def set_password(self, name: str, password: str) -> None:
        if len(password) < 8:
            raise UserError("a password needs at least 8 characters", field="password")
        self.user(name)
        with self.db.transaction() as conn:
            conn.execute("UPDATE users SET password_hash = ? WHERE name = ?", (hash_password(password), name))

    def check_password(self, name: str, password: str) -> User | None:
        """The user, if the password is theirs. An unknown user costs the same scrypt work as a wrong password,
        so the answer's timing does not tell which user names exist."""
        row = self.db.execute("SELECT * FROM users WHERE name = ?", (name,)).fetchone()
        stored = row["password_hash"] if row is not None else None
        if not stored:
            verify_password(password, _decoy_hash())
            return None
        return _user(row) if verify_password(password, stored) else None

    # ----------------------------------------------------------------------------------------- tokens
    def create_token(self, name: str, label: str = "") -> str:
        """A new token for the user; the only time it is shown."""
        user = self.user(name)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO tokens (user_id, name, prefix, hash) VALUES (?, ?, ?, ?)",
                (user.id, label, token[:10], token_hash(token)),
            )
        return token

    def user_for_token(self, token: str) -> User | None:
        row = self.db.execute(
            "SELECT users.* FROM tokens JOIN users ON users.id = tokens.user_id WHERE tokens.hash = ? AND NOT revoked",
            (token_hash(token),),
        ).fetchone()
        return _user(row) if row else None

    def tokens(self, name: str) -> list[dict]:
        user = self.user(name)
        rows = self.db.execute(
            "SELECT id, name, prefix, created, revoked FROM tokens WHERE user_id = ? ORDER BY id", (user.id,)
        )
        return [dict(r) for r in rows]

    def revoke_token_value(self, token: str, *, label: str) -> bool:
        """Revoke a token given by its value, if it carries `label` (a web session's token, not an API token
        the user pasted); True when one was revoked."""
        with self.db.transaction() as conn:
            done = conn.execute(
                "UPDATE tokens SET revoked = 1 WHERE hash = ? AND name = ? AND NOT revoked", (token_hash(token), label)
            )
        return done.rowcount == 1

    def revoke_token(self, name: str, token_id: int) -> None:
        user = self.user(name)
        with self.db.transaction() as conn:
            done = conn.execute("UPDATE tokens SET revoked = 1 WHERE id = ? AND user_id = ?", (token_id, user.id))
            if done.rowcount == 0:
                raise NotFound(f"user {name!r} has no token {token_id}", field="token")

    # ---------------------------------------------------------------------------------------- credits
    def grant(self, name: str, amount: int, note: str = "") -> User:
        if amount == 0:
            raise UserError("grant a non-zero amount of credits", field="amount")
        user = self.user(name)
        with self.db.transaction() as conn:
            if amount < 0 and user.balance + amount < 0:
                raise InsufficientCredits(f"{name} has {user.balance} credits; cannot take {-amount}", field="amount")
            conn.execute("UPDATE users SET balance = balance + ? WHERE id = ?", (amount, user.id))
            conn.execute(
                "INSERT INTO ledger (user_id, delta, reason, note) VALUES (?, ?, ?, ?)",
                (user.id, amount, "grant" if amount > 0 else "adjust", note),
            )
        return self.user(name)

    @staticmethod
    def debit(conn, user_id: int, amount: int, job_id: str) -> None:
        """Inside the caller's transaction (the job insert): take `amount` or raise, never overdraw."""
        taken = conn.execute(
            "UPDATE users SET balance = balance - ? WHERE id = ? AND balance >= ?", (amount, user_id, amount)
        )
        if taken.rowcount == 0:
            balance = conn.execute("SELECT balance FROM users WHERE id = ?", (user_id,)).fetchone()[0]
            raise InsufficientCredits(
                f"this job costs {amount} credits and the balance is {balance}; ask an admin for credits",
                field="credits",
            )
        conn.execute(
            "INSERT INTO ledger (user_id, delta, reason, job_id) VALUES (?, ?, 'debit', ?)", (user_id, -amount, job_id)
        )

    @staticmethod
    def refund(conn, job_id: str) -> int:
        """Inside the caller's transaction: give back what the job was debited, at most once."""
        row = conn.execute(
            "SELECT user_id, delta FROM ledger WHERE job_id = ? AND reason = 'debit'", (job_id,)
        ).fetchone()
        if row is None:
            return 0
        if conn.execute("SELECT 1 FROM ledger WHERE job_id = ? AND reason = 'refund'", (job_id,)).fetchone():
            return 0
        amount = -row["delta"]
        conn.execute("UPDATE users SET balance = balance + ? WHERE id = ?", (amount, row["user_id"]))
        conn.execute(
            "INSERT INTO ledger (user_id, delta, reason, job_id) VALUES (?, ?, 'refund', ?)",
            (row["user_id"], amount, job_id),
        )
        return amount

    def ledger(self, name: str, limit: int = 20, before: int | None = None) -> list[dict]:
        """The newest `limit` rows, newest first; `before` (a row id) pages back to older ones."""
        user = self.user(name)
        rows = self.db.execute(
            "SELECT id, delta, reason, job_id, note, created FROM ledger WHERE user_id = ? AND id < ? "
            "ORDER BY id DESC LIMIT ?",
            (user.id, before if before is not None else 2**63 - 1, limit),
        )
        return [dict(r) for r in rows]


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    n, r, p = 2**14, 8, 1
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=32)
    return f"scrypt${n}${r}${p}${salt.hex()}${digest.hex()}"


@functools.cache
def _decoy_hash() -> str:
    return hash_password(secrets.token_urlsafe(16))


def verify_password(password: str, stored: str) -> bool:
    try:
        _, n, r, p, salt, digest = stored.split("$")
        candidate = hashlib.scrypt(
            password.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p), dklen=len(digest) // 2
        )
    except ValueError:
        return False
    return hmac.compare_digest(candidate.hex(), digest)
