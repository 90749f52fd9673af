"""A Kubernetes API server stand-in for the operator tests, built on kmock's emulator.

kmock keeps objects and streams watch events; this subclass adds the parts of the
API contract that kopf and our operator rely on: metadata.uid, resourceVersion,
creationTimestamp, generation (bumped on spec changes only) and generateName;
the 256 KiB limit on an object's annotations; the status subresource (``/status``
writes touch only ``status``, main-resource writes never touch it); JSON-patch
``test`` failures answered with 422 as the API server does; labelSelector on
list and watch. It also counts writes per URL, so tests can assert how many status patches a change caused.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import datetime
import itertools
import json
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import kmock
from kmock._internal import enums, rendering

STATUS_SUBRESOURCE_RESOURCES = {"falcorules", "falcoconfigs"}


def _selector_matches(selector: str, labels: Mapping[str, str]) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


@attrs.define(kw_only=True)
class FalcoApiServerEmulator(kmock.KubernetesEmulator):
    _versions: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1), init=False)
    writes: collections.Counter[tuple[str, str]] = attrs.field(factory=collections.Counter, init=False)
    base_url: str = ""

    def status_patches(self, plural: str, name: str | None = None) -> int:
        return sum(
            count
            for (method, path), count in self.writes.items()
            if method == "PATCH"
            and path.endswith("/status")
            and f"/{plural}/" in path
            and (name is None or path.endswith(f"/{plural}/{name}/status"))
        )

    namespaces: tuple[str, ...] = ("default", "falco", "kube-system")

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # kmock cannot parse the cluster-wide namespace list URL (it takes "namespaces" for a
        # namespace prefix), so the fixed set of namespaces is served here.
        if raw_request.path.rstrip("/") == "/api/v1/namespaces" and raw_request.method == "GET":
            return await self._serve_namespaces(raw_request)
        return await super().__call__(raw_request)

    async def _serve_namespaces(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        items = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}} for n in self.namespaces]
        if raw_request.query.get("watch") != "true":
            return aiohttp.web.json_response(
                {"kind": "NamespaceList", "metadata": {"resourceVersion": "1"}, "items": items}
            )
        response = aiohttp.web.StreamResponse()
        await response.prepare(raw_request)
        for item in items:
            await response.write(json.dumps({"type": "ADDED", "object": item}).encode() + b"\n")
        timeout = float(raw_request.query.get("timeoutSeconds") or 60)
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await asyncio.sleep(timeout)
        return response

    def _now(self) -> str:
        return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    def _key(self, request: rendering.Request) -> Any:
        return (request.resource, request.namespace, request.name)

    async def _handle(self, request: rendering.Request) -> Any:
        if request.resource is not None and request.action in (enums.action.CREATE, enums.action.UPDATE):
            self.writes[(str(request.method.value), request.url.path)] += 1
            try:
                if request.action == enums.action.CREATE:
                    request = self._prepare_create(request)
                else:
                    request = self._prepare_update(request)
            except kmock.KubernetesError as error:
                return await self._render_error(error)
        elif request.resource is not None and request.action == enums.action.DELETE:
            self.writes[("DELETE", request.url.path)] += 1
        return await super()._handle(request)

    def _prepare_create(self, request: rendering.Request) -> rendering.Request:
        body = copy.deepcopy(request.data) if isinstance(request.data, dict) else None
        if body is None:
            raise kmock.KubernetesError(400, "BadRequest", "the request body is not a JSON object")
        meta = body.setdefault("metadata", {})
        _check_annotations_size(meta)
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise kmock.KubernetesError(
                    422, "Invalid", "metadata.name or metadata.generateName is required"
                )
            meta["name"] = f"{meta['generateName']}{uuid.uuid4().hex[:5]}"
        meta["uid"] = str(uuid.uuid4())
        meta["resourceVersion"] = str(next(self._versions))
        meta["creationTimestamp"] = self._now()
        meta["generation"] = 1
        if request.resource is not None and request.resource.plural in STATUS_SUBRESOURCE_RESOURCES:
            body.pop("status", None)  # ignored on create when the status subresource is enabled
        return _with_data(request, body)

    def _prepare_update(self, request: rendering.Request) -> rendering.Request:
        key = self._key(request)
        if key not in self._objects or self._objects[key].deleted:
            raise kmock.KubernetesObjectNotFoundError()
        current = copy.deepcopy(self._objects[key].raw)
        patch = request.data
        try:
            if isinstance(patch, list):
                updated = jsonpatch.apply_patch(current, patch, in_place=False)
            elif isinstance(patch, dict):
                updated = _merge_patch(current, patch)
            else:
                raise kmock.KubernetesError(
                    400, "BadRequest", "the patch is neither a JSON object nor a JSON patch"
                )
        except jsonpatch.JsonPatchTestFailed as error:
            raise kmock.KubernetesError(
                422, "Invalid", f"the server rejected our request: {error}"
            ) from error
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as error:
            raise kmock.KubernetesError(422, "Invalid", f"invalid patch: {error}") from error
        plural = request.resource.plural if request.resource is not None else None
        if plural in STATUS_SUBRESOURCE_RESOURCES:
            if request.subresource == "status":
                updated = {**current, "status": updated.get("status")}
                updated["metadata"] = current["metadata"]
            else:
                updated["status"] = current.get("status")
            if updated.get("status") is None:
                updated.pop("status", None)
        meta = updated.setdefault("metadata", {})
        _check_annotations_size(meta)
        for immutable in ("uid", "creationTimestamp", "name", "namespace"):
            if immutable in current.get("metadata", {}):
                meta[immutable] = current["metadata"][immutable]
        meta["generation"] = current.get("metadata", {}).get("generation", 1) + (
            1 if updated.get("spec") != current.get("spec") else 0
        )
        meta["resourceVersion"] = str(next(self._versions))
        return _with_data(request, [{"op": "replace", "path": "", "value": updated}])

    async def _serve_list(self, request: rendering.Request) -> Any:
        result = await super()._serve_list(request)
        selector = request.params.get("labelSelector")
        if selector:
            result["items"] = [
                item
                for item in result["items"]
                if _selector_matches(selector, item.get("metadata", {}).get("labels") or {})
            ]
        result["metadata"]["resourceVersion"] = str(next(self._versions))
        return result

    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[Any]:
        selector = request.params.get("labelSelector")
        async for event in super()._serve_watch(request):
            if selector and isinstance(event, dict):
                labels = event.get("object", {}).get("metadata", {}).get("labels") or {}
                if not _selector_matches(selector, labels):
                    continue
            yield event


# The API server refuses objects whose annotations (keys and values) exceed 256 KiB in total.
TOTAL_ANNOTATION_SIZE_LIMIT = 256 * 1024


def _check_annotations_size(meta: Mapping[str, Any]) -> None:
    annotations = meta.get("annotations") or {}
    total = sum(len(str(k)) + len(str(v)) for k, v in annotations.items())
    if total > TOTAL_ANNOTATION_SIZE_LIMIT:
        raise kmock.KubernetesError(
            422,
            "Invalid",
            f"metadata.annotations: Too long: must have at most {TOTAL_ANNOTATION_SIZE_LIMIT} bytes",
        )


def _with_data(request: rendering.Request, data: Any) -> rendering.Request:
    # kmock matches reactions against the very request object it recorded, so it is
    # amended in place (the recorded request then shows what the server applied).
    object.__setattr__(request, "data", data)
    return request


def _merge_patch(current: dict[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """RFC 7386 JSON merge patch (what kopf sends as application/merge-patch+json)."""
    result = dict(current)
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(result.get(key), dict):
            result[key] = _merge_patch(result[key], value)
        elif isinstance(value, Mapping):
            result[key] = _merge_patch({}, value)
        else:
            result[key] = copy.deepcopy(value)
    return result
