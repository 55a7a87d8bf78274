"""server/wire: the pieces both faces of the server speak, torch-free."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from server.wire.head_timeout import HeadTimeoutProtocol, head_timeout_protocol
from server.wire.protocol import request_id_of, without_reserved

REPO = Path(__file__).resolve().parent.parent


def test_the_head_timeout_protocol_overrides_methods_uvicorn_still_has():
    """It subclasses a class uvicorn does not publish (pyproject pins uvicorn's minor version): a method it
    overrides that uvicorn renamed would silently stop being called."""
    overridden = {name for name, value in vars(HeadTimeoutProtocol).items()
                  if callable(value) and not name.startswith("_")}
    assert overridden == {"connection_made", "data_received", "send_400_response", "on_message_begin",
                          "on_headers_complete", "connection_lost", "shutdown"}
    assert all(callable(getattr(HttpToolsProtocol, name, None)) for name in overridden)
    assert head_timeout_protocol(2.5).timeout_s == 2.5 and issubclass(
        head_timeout_protocol(1), HttpToolsProtocol
    )


def test_request_ids_and_reserved_headers():
    assert request_id_of([(b"x-request-id", b"client-1.a_b")]) == "client-1.a_b"
    made = request_id_of([(b"x-request-id", b"not valid!")])
    assert len(made) == 32 and int(made, 16) >= 0
    assert without_reserved([(b"x-mame-client", b"1.2.3.4"), (b"accept", b"*/*")]) == [(b"accept", b"*/*")]


def test_wire_and_front_ends_import_no_torch():
    code = (
        "import sys, server.wire.body, server.wire.channel, server.wire.head_timeout, "
        "server.frontend.__main__; sys.exit('torch' in sys.modules or 'timm' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, check=False).returncode == 0
