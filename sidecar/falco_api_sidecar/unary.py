"""falco.api.unary: version, rules, configs and apply. Thin: the store validates and writes,
the coordinator gets Falco's verdict; this maps both to the contract and to gRPC statuses."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import grpc
from google.protobuf import json_format, struct_pb2

from falco_api.configs import effective_config
from falco_api.contract.falco import version_pb2
from falco_api.contract.falco.api import apply_pb2, configs_pb2, rules_pb2, unary_pb2_grpc
from falco_api.servicers import VersionServicer
from falco_api_sidecar.managed import (
    ConfigSpec,
    CorruptStoreError,
    FindingLike,
    InvalidRequestError,
    LoadState,
    LoadStatus,
    ManagedConfig,
    ManagedError,
    ManagedRuleset,
    ManagedStore,
    NotFoundError,
    RulesetSpec,
    ValidationFailedError,
    VersionConflictError,
    WriteResult,
)
from falco_api_sidecar.writes import WriteCoordinator, WriteOutcome

Context = grpc.aio.ServicerContext[Any, Any]
AuditHook = Callable[[Context, str, str, str, str, str], None]

_STATE = {
    LoadState.PENDING: rules_pb2.LoadStatus.STATE_PENDING,
    LoadState.LOADED: rules_pb2.LoadStatus.STATE_LOADED,
    LoadState.FAILED: rules_pb2.LoadStatus.STATE_FAILED,
    LoadState.UNKNOWN: rules_pb2.LoadStatus.STATE_UNKNOWN,
}


def status_message(status: LoadStatus) -> rules_pb2.LoadStatus:
    message = rules_pb2.LoadStatus(state=_STATE[status.state], message=status.message)
    if status.since:
        message.since.FromNanoseconds(int(status.since * 1e9))
    return message


def finding_message(finding: FindingLike) -> rules_pb2.ValidationError:
    return rules_pb2.ValidationError(
        file=finding.file,
        item_kind=finding.item_kind,
        item_name=finding.item_name,
        line=max(finding.line, 0),
        column=max(finding.column, 0),
        message=finding.message,
        severity=finding.severity,
    )


def ruleset_message(ruleset: ManagedRuleset, *, include_content: bool = True) -> rules_pb2.Ruleset:
    return rules_pb2.Ruleset(
        name=ruleset.name,
        content=ruleset.content if include_content else "",
        order=ruleset.order,
        sha256=ruleset.sha256,
        version=ruleset.version,
        status=status_message(ruleset.status),
    )


def config_message(config: ManagedConfig) -> configs_pb2.ConfigDropIn:
    message = configs_pb2.ConfigDropIn(
        name=config.name,
        order=config.order,
        sha256=config.sha256,
        version=config.version,
        status=status_message(config.status),
    )
    message.settings.update(config.settings)
    return message


def settings_dict(settings: struct_pb2.Struct) -> dict[str, Any]:
    return json_format.MessageToDict(settings)


def write_result_message(outcome: WriteOutcome) -> apply_pb2.WriteResult:
    result = outcome.result
    return apply_pb2.WriteResult(
        changed=result.changed,
        status=status_message(outcome.status),
        rolled_back=outcome.rolled_back,
        errors=[finding_message(f) for f in result.warnings],
        state_sha256=result.state_sha256,
    )


def _expected(has: bool, value: int) -> int | None:
    return value if has else None


class UnaryServicer(unary_pb2_grpc.unaryServicer):
    def __init__(
        self,
        version: VersionServicer,
        *,
        store: ManagedStore | None = None,
        writes: WriteCoordinator | None = None,
        audit: AuditHook | None = None,
        base_config_path: Path | None = None,
    ) -> None:
        self._version = version
        self._base_config_path = base_config_path
        self._store = store
        self._writes = writes
        self._audit = audit

    async def version(  # type: ignore[override]
        self, request: version_pb2.request, context: Context
    ) -> version_pb2.response:
        return await self._version.version(request, context)

    # -- helpers -----------------------------------------------------------------------------

    async def _need_store(self, context: Context) -> tuple[ManagedStore, WriteCoordinator]:
        if self._store is None or self._writes is None:
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED,
                "this server manages no rules or configs (start the sidecar with --managed-root)",
            )
            raise AssertionError("unreachable")
        return self._store, self._writes

    @staticmethod
    async def _abort_for(error: ManagedError, context: Context) -> NoReturn:
        code = grpc.StatusCode.INTERNAL
        if isinstance(error, InvalidRequestError | ValidationFailedError):
            code = grpc.StatusCode.INVALID_ARGUMENT
        elif isinstance(error, NotFoundError):
            code = grpc.StatusCode.NOT_FOUND
        elif isinstance(error, VersionConflictError | CorruptStoreError):
            code = grpc.StatusCode.FAILED_PRECONDITION
        await context.abort(code, str(error))
        raise AssertionError("unreachable")

    async def _write(
        self, context: Context, action: str, target: str, operation: Callable[[], WriteResult]
    ) -> WriteOutcome:
        store, writes = await self._need_store(context)
        old_sha = store.state_sha256
        try:
            outcome = await writes.write(operation)
        except ManagedError as error:
            self._record(context, action, target, old_sha, "", f"refused: {error}".splitlines()[0])
            await self._abort_for(error, context)
        except asyncio.CancelledError:
            # The coordinator finishes the write (verdict, rollback) without the caller.
            self._record(context, action, target, old_sha, "", "caller went away before Falco's verdict")
            raise
        result = "rolled back: " if outcome.rolled_back else ""
        self._record(
            context, action, target, old_sha, outcome.result.state_sha256, result + outcome.status.state.value
        )
        return outcome

    def _record(self, context: Context, action: str, target: str, old: str, new: str, result: str) -> None:
        if self._audit is not None:
            self._audit(context, action, target, old, new, result)

    # -- rules -------------------------------------------------------------------------------

    async def list_rules(  # type: ignore[override]
        self, request: rules_pb2.ListRulesRequest, context: Context
    ) -> rules_pb2.ListRulesResponse:
        store, _ = await self._need_store(context)
        rulesets = await asyncio.to_thread(store.list_rulesets)
        return rules_pb2.ListRulesResponse(
            rulesets=[ruleset_message(r, include_content=request.include_content) for r in rulesets]
        )

    async def get_rule(  # type: ignore[override]
        self, request: rules_pb2.GetRuleRequest, context: Context
    ) -> rules_pb2.Ruleset:
        store, _ = await self._need_store(context)
        try:
            return ruleset_message(await asyncio.to_thread(store.get_ruleset, request.name))
        except ManagedError as error:
            await self._abort_for(error, context)

    async def put_rule(  # type: ignore[override]
        self, request: rules_pb2.PutRuleRequest, context: Context
    ) -> apply_pb2.PutRuleResponse:
        store, _ = await self._need_store(context)
        ruleset = request.ruleset
        outcome = await self._write(
            context,
            "put_rule",
            ruleset.name,
            lambda: store.put_ruleset(
                ruleset.name,
                ruleset.content,
                ruleset.order,
                expected_version=_expected(request.HasField("expected_version"), request.expected_version),
            ),
        )
        # Read back: the statuses now carry Falco's verdict, and a rollback may have replaced it.
        current = [r for r in await asyncio.to_thread(store.list_rulesets) if r.name == ruleset.name]
        return apply_pb2.PutRuleResponse(
            result=write_result_message(outcome),
            ruleset=ruleset_message(current[0]) if current else None,
        )

    async def delete_rule(  # type: ignore[override]
        self, request: rules_pb2.DeleteRuleRequest, context: Context
    ) -> apply_pb2.DeleteRuleResponse:
        store, _ = await self._need_store(context)
        outcome = await self._write(
            context,
            "delete_rule",
            request.name,
            lambda: store.delete_ruleset(
                request.name,
                expected_version=_expected(request.HasField("expected_version"), request.expected_version),
            ),
        )
        return apply_pb2.DeleteRuleResponse(result=write_result_message(outcome))

    async def validate_rules(  # type: ignore[override]
        self, request: rules_pb2.ValidateRulesRequest, context: Context
    ) -> rules_pb2.ValidateRulesResponse:
        store, _ = await self._need_store(context)
        specs = [RulesetSpec(r.name, r.content, r.order) for r in request.rulesets]
        try:
            findings = await asyncio.to_thread(store.validate_rulesets, specs, standalone=request.standalone)
        except ManagedError as error:
            await self._abort_for(error, context)
        return rules_pb2.ValidateRulesResponse(
            valid=not any(f.severity == "error" for f in findings),
            errors=[finding_message(f) for f in findings],
        )

    # -- configs -----------------------------------------------------------------------------

    async def get_config(  # type: ignore[override]
        self, request: configs_pb2.GetConfigRequest, context: Context
    ) -> configs_pb2.GetConfigResponse:
        store, _ = await self._need_store(context)
        dropins = await asyncio.to_thread(store.list_configs)
        merged = await asyncio.to_thread(
            effective_config, self._base_config_path, [(c.name, c.settings) for c in dropins]
        )
        response = configs_pb2.GetConfigResponse(
            dropins=[config_message(c) for c in dropins], base_included=merged.base_included
        )
        response.effective.update(merged.effective)
        return response

    async def put_config(  # type: ignore[override]
        self, request: configs_pb2.PutConfigRequest, context: Context
    ) -> apply_pb2.PutConfigResponse:
        store, _ = await self._need_store(context)
        dropin = request.dropin
        settings = settings_dict(dropin.settings)
        outcome = await self._write(
            context,
            "put_config",
            dropin.name,
            lambda: store.put_config(
                dropin.name,
                settings,
                dropin.order,
                expected_version=_expected(request.HasField("expected_version"), request.expected_version),
            ),
        )
        current = [c for c in await asyncio.to_thread(store.list_configs) if c.name == dropin.name]
        return apply_pb2.PutConfigResponse(
            result=write_result_message(outcome), dropin=config_message(current[0]) if current else None
        )

    async def delete_config(  # type: ignore[override]
        self, request: configs_pb2.DeleteConfigRequest, context: Context
    ) -> apply_pb2.DeleteConfigResponse:
        store, _ = await self._need_store(context)
        outcome = await self._write(
            context,
            "delete_config",
            request.name,
            lambda: store.delete_config(
                request.name,
                expected_version=_expected(request.HasField("expected_version"), request.expected_version),
            ),
        )
        return apply_pb2.DeleteConfigResponse(result=write_result_message(outcome))

    # -- apply -------------------------------------------------------------------------------

    async def apply(  # type: ignore[override]
        self, request: apply_pb2.ApplyRequest, context: Context
    ) -> apply_pb2.ApplyResponse:
        store, _ = await self._need_store(context)
        rulesets = [RulesetSpec(r.name, r.content, r.order) for r in request.rulesets]
        configs = [ConfigSpec(c.name, settings_dict(c.settings), c.order) for c in request.configs]
        names = ",".join(r.name for r in rulesets)
        outcome = await self._write(
            context,
            "apply",
            f"rules=[{names}] configs={len(configs)}",
            lambda: store.apply(rulesets, configs, dry_run=request.dry_run),
        )
        return apply_pb2.ApplyResponse(
            result=write_result_message(outcome),
            rulesets=[ruleset_message(r) for r in await asyncio.to_thread(store.list_rulesets)],
            configs=[config_message(c) for c in await asyncio.to_thread(store.list_configs)],
        )


def register_unary(servicer: UnaryServicer) -> Callable[[grpc.aio.Server], None]:
    def register(server: grpc.aio.Server) -> None:
        unary_pb2_grpc.add_unaryServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]

    return register
