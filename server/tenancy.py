"""Tenants: the policy each API key's tenant is served under, and what each uses now. Owns the per-tenant
limits checked before a generation request is admitted (its own requests in flight and tokens a minute, and
its share of the server's pool of requests in flight) and the weights the engine's fair queue serves
tenants by. A 429 always names the limit of the tenant that sent the request, never another's.

The policy file (`--tenant-policy-file`, TOML):

    [default]                 # every tenant not named below
    priority = "normal"       # high, normal or low: weights 4, 2, 1 in the engine's fair queue
    max_in_flight = 32        # generation requests running or queued at once
    tokens_per_minute = 200000  # prompt and generated tokens, as a bucket refilled continuously

    [tenants.batch-jobs]      # a name given to keys in the keys file (`inference:KEY batch-jobs`)
    priority = "low"
"""

import collections
import math
import time
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import APIError
from server.metrics import REJECTED, TENANT_IN_FLIGHT, TENANT_REJECTED

Priority = Literal["high", "normal", "low"]
WEIGHTS: dict[Priority, float] = {"high": 4.0, "normal": 2.0, "low": 1.0}
GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})


class TenantPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    priority: Priority = "normal"
    max_in_flight: int | None = Field(None, gt=0)
    tokens_per_minute: int | None = Field(None, gt=0)

    @property
    def weight(self) -> float:
        return WEIGHTS[self.priority]


class PolicyFile(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    default: TenantPolicy = TenantPolicy()
    tenants: dict[str, TenantPolicy] = {}

    @classmethod
    def load(cls, path: Path | None, known: set[str]) -> "PolicyFile":
        """The file's policies (defaults without one); a tenant no key belongs to is an error, as a typo
        would otherwise leave a tenant unlimited without a word."""
        if path is None:
            return cls()
        try:
            policy = cls.model_validate(tomllib.loads(path.read_text()))
        except OSError as exc:
            raise SystemExit(f"--tenant-policy-file {path}: {exc.strerror}") from exc
        except (tomllib.TOMLDecodeError, ValidationError) as exc:
            raise SystemExit(f"--tenant-policy-file {path}: {exc}") from exc
        if unknown := sorted(set(policy.tenants) - known):
            raise SystemExit(f"--tenant-policy-file {path}: no API key belongs to tenant(s) {', '.join(unknown)} "
                             f"(name a key's tenant in the keys file: `inference:KEY NAME`)")
        return policy

    def of(self, tenant: str) -> TenantPolicy:
        return self.tenants.get(tenant, self.default)


class TokenBucket:
    """`per_minute` tokens, refilled continuously; a request may overdraw it (by a minute's tokens at most, so
    no wait exceeds two minutes), and the next waits for the refill."""

    def __init__(self, per_minute: int):
        self.capacity, self.rate = float(per_minute), per_minute / 60
        self.level, self._updated = self.capacity, time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self._updated) * self.rate)
        self._updated = now

    def charge(self, tokens: int) -> None:
        self._refill()
        self.level = max(self.level - tokens, -self.capacity)

    def wait_s(self) -> float:
        """Seconds until the bucket holds a token again; 0 when it does."""
        self._refill()
        return 0.0 if self.level > 0 else (1 - self.level) / self.rate


class Tenants:
    """Each tenant's requests in flight and token bucket, checked against its policy; `pool` requests in flight
    in all (--max-num-seqs + --max-queued-requests), which tenants share by weight when it is full: a tenant
    below its share is still admitted, up to twice the pool in all (the bound on memory)."""

    def __init__(self, policy: PolicyFile, pool: int):
        self.policy, self.pool = policy, pool
        self.in_flight: collections.Counter[str] = collections.Counter()
        self._buckets: dict[str, TokenBucket] = {}

    def weight(self, tenant: str) -> float:
        return self.policy.of(tenant).weight

    def charge(self, tenant: str, tokens: int) -> None:
        if (per_minute := self.policy.of(tenant).tokens_per_minute) is not None:
            self._buckets.setdefault(tenant, TokenBucket(per_minute)).charge(tokens)

    def refusal(self, tenant: str) -> APIError | None:
        """Why `tenant` may not start another request now (a 429 naming its own limit), or None."""
        policy, holding = self.policy.of(tenant), self.in_flight[tenant]
        who = f"tenant `{tenant}`" if tenant else "this server's clients"
        if policy.max_in_flight is not None and holding >= policy.max_in_flight:
            return _too_many("tenant_in_flight_limit", f"{who} has {holding} requests in flight, its limit (max_in_"
                                                       f"flight {policy.max_in_flight}); retry when one ends", 1)
        if (bucket := self._buckets.get(tenant)) is not None and (wait := bucket.wait_s()) > 0:
            return _too_many("tenant_token_limit", f"{who} used its {policy.tokens_per_minute} tokens per minute; "
                                                   f"retry in {math.ceil(wait)} s", math.ceil(wait))
        total = sum(self.in_flight.values())
        if total >= 2 * self.pool:
            return _too_many("over_capacity", f"the server holds {total} requests in flight, twice its limit of "
                                              f"{self.pool}, and refuses every tenant until some end; retry shortly", 1)
        if total >= self.pool:
            sending = {name for name, n in self.in_flight.items() if n} | {tenant}
            share = max(1, int(self.pool * policy.weight / sum(map(self.weight, sending))))
            if holding >= share:
                return _too_many("over_capacity", f"the server is at its limit of {self.pool} requests in flight, "
                                                  f"and {who} holds {holding} of them, its share while {len(sending)} "
                                                  f"tenant(s) send; retry shortly", 1)
        return None

    def enter(self, tenant: str) -> None:
        self.in_flight[tenant] += 1
        TENANT_IN_FLIGHT.labels(tenant).inc()

    def leave(self, tenant: str) -> None:
        self.in_flight[tenant] -= 1
        TENANT_IN_FLIGHT.labels(tenant).dec()
        if not self.in_flight[tenant]:
            del self.in_flight[tenant]


def _too_many(code: str, message: str, retry_after_s: int) -> APIError:
    return APIError(429, message, type="rate_limit_error", code=code, headers={"Retry-After": str(retry_after_s)})


class TenantAdmission:
    """Pure ASGI, inside the key check (which names the tenant): a generation request counts against its
    tenant until its last byte is sent or its client leaves."""

    def __init__(self, app: ASGIApp, tenants: Tenants):
        self.app, self.tenants = app, tenants

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in GENERATION_PATHS:
            await self.app(scope, receive, send)
            return
        tenant = scope.get("state", {}).get("tenant", "")
        if (refused := self.tenants.refusal(tenant)) is not None:
            REJECTED.labels(refused.body.error.code).inc()
            TENANT_REJECTED.labels(tenant, refused.body.error.code).inc()
            await refused.response()(scope, receive, send)
            return
        self.tenants.enter(tenant)
        try:
            await self.app(scope, receive, send)
        finally:
            self.tenants.leave(tenant)
