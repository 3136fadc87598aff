"""The public surface of r2m.client changes only on purpose: edit this list when you mean to."""

import types

import r2m.client

PUBLIC = [
    "BINARY_CONTENT_TYPE",
    "AsyncR2MClient",
    "AuthenticationError",
    "EmbedResult",
    "InvalidRequest",
    "PreferencesResult",
    "R2MClient",
    "R2MError",
    "ScoreResult",
    "ServerError",
    "ServiceUnavailable",
    "StaleHead",
    "Timeout",
    "TransportError",
    "WireError",
    "WireTensor",
]


def test_all_is_pinned():
    assert sorted(r2m.client.__all__) == sorted(PUBLIC)


def test_every_public_name_is_exported_and_exists():
    # Submodules (r2m.client.verl, once imported) are attributes of the package, not its public surface.
    public = {
        name
        for name, member in vars(r2m.client).items()
        if not name.startswith("_") and not isinstance(member, types.ModuleType)
    }
    assert public == set(r2m.client.__all__)
    for name in r2m.client.__all__:
        member = getattr(r2m.client, name)
        assert name == "BINARY_CONTENT_TYPE" or member.__module__.startswith("r2m.client.")


def test_the_wire_error_is_one_class_for_client_and_service():
    from r2m.client import _exceptions, wire

    assert r2m.client.WireError is wire.WireError is _exceptions.WireError
    assert issubclass(r2m.client.WireError, (r2m.client.R2MError, ValueError))
