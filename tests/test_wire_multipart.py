"""The in-memory multipart/form-data splitter against bodies real clients (httpx) encode."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from server.wire.multipart import MultipartError, Part, TooManyParts, parse_multipart


def encoded(**kwargs) -> tuple[bytes, str]:
    request = httpx.Request("POST", "http://x/", **kwargs)
    return request.read(), request.headers["content-type"]


def test_files_and_fields_as_httpx_sends_them():
    jpeg = b"\xff\xd8\xff\xe0 binary\r\n--not-the-boundary\r\n\r\n bytes \x00\xff"
    body, content_type = encoded(files=[("file", ("a b.jpg", jpeg, "image/jpeg")),
                                        ("file", ("c.png", b"", "image/png"))], data={"note": "hello"})
    parts = parse_multipart(body, content_type, max_parts=10)
    assert parts == [Part("note", None, None, b"hello"), Part("file", "a b.jpg", "image/jpeg", jpeg),
                     Part("file", "c.png", "image/png", b"")]


def test_preamble_epilogue_quoted_boundary_and_untyped_parts():
    body = (b"a preamble\r\n--b:1 2\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x\"\r\n\r\n"
            b"DATA\r\n--b:1 2--\r\nan epilogue")
    assert parse_multipart(body, 'multipart/form-data; boundary="b:1 2"', 5) == [
        Part("file", "x", None, b"DATA")
    ]


@pytest.mark.parametrize(
    "body, content_type, problem",
    [
        (b"--xyz\r\n\r\n", "multipart/form-data", "no valid boundary"),
        (b"garbage", "multipart/form-data; boundary=xyz", "does not start with the boundary"),
        (
            b'--xyz\r\nContent-Disposition: form-data; name="f"\r\n\r\ndata',
            "multipart/form-data; boundary=xyz",
            "without the closing boundary",
        ),
        (
            b'--xyz\r\nContent-Disposition: form-data; name="f"',
            "multipart/form-data; boundary=xyz",
            "do not end",
        ),
        (b"--xyz\r\nno colon here\r\n\r\nx\r\n--xyz--", "multipart/form-data; boundary=xyz", "'Name: value'"),
        (
            b"--xyz\r\nContent-Type: text/plain\r\n\r\nx\r\n--xyz--",
            "multipart/form-data; boundary=xyz",
            "no Content-Disposition",
        ),
        (b"--xyzjunk\r\n\r\n", "multipart/form-data; boundary=xyz", "does not end with CRLF"),
    ],
)
def test_malformed_bodies_are_errors(body, content_type, problem):
    with pytest.raises(MultipartError, match=problem):
        parse_multipart(body, content_type, max_parts=5)


def test_part_limit():
    body, content_type = encoded(files=[("file", (f"{i}.png", b"x", "image/png")) for i in range(4)])
    assert len(parse_multipart(body, content_type, max_parts=4)) == 4
    with pytest.raises(TooManyParts):
        parse_multipart(body, content_type, max_parts=3)


def test_quoted_parameters_may_hold_semicolons_and_escaped_quotes():
    body = (b'--x\r\nContent-Disposition: form-data; name="file"; filename="a \\"b\\" c;d.jpg"\r\n'
            b"Content-Type: image/jpeg\r\n\r\nJ\r\n--x--\r\n")
    assert parse_multipart(body, "multipart/form-data; boundary=x", 2) == [
        Part("file", 'a "b" c;d.jpg', "image/jpeg", b"J")
    ]


def test_names_are_utf8_and_a_long_header_costs_linear_time():
    body = (
        '--x\r\nContent-Disposition: form-data; name="fïle"; filename="çat.jpg"\r\n\r\nJ\r\n--x--\r\n'
    ).encode()
    assert parse_multipart(body, "multipart/form-data; boundary=x", 2) == [
        Part("fïle", "çat.jpg", None, b"J")
    ]
    # A 40 KB unquoted parameter word held the event loop for 10 s in a regex (quadratic: 200 KB would take
    # minutes). Parsed linearly it takes about a millisecond; 30 s is a bound on complexity, not a speed
    # target.
    long_header = (
        b'--x\r\nContent-Disposition: form-data; name="file"; ' + b"a" * 200_000 + b"\r\n\r\nJ\r\n--x--\r\n"
    )
    pool = ThreadPoolExecutor(1)
    try:
        parsed = pool.submit(parse_multipart, long_header, "multipart/form-data; boundary=x", 2)
        assert parsed.result(timeout=30)[0].name == "file"
    finally:
        pool.shutdown(wait=False)  # a quadratic parse would go on for minutes: do not wait for it


def test_file_fields_with_or_without_a_filename_are_the_images():
    from server.wire.body import image_payloads
    from server.wire.errors import ApiError

    body = (b'--b\r\nContent-Disposition: form-data; name="file"\r\nContent-Type: image/jpeg\r\n\r\nJPEG1\r\n'
            b'--b\r\nContent-Disposition: form-data; name="note"\r\n\r\nhi\r\n'
            b'--b\r\nContent-Disposition: form-data; name="file"; filename="b.jpg"\r\n\r\nJPEG2\r\n--b--\r\n')
    payloads, multipart = image_payloads("multipart/form-data; boundary=b", body, max_files=4)
    assert payloads == [("file", b"JPEG1"), ("b.jpg", b"JPEG2")] and multipart
    with pytest.raises(ApiError, match="no `file` field.*fields: 'image'"):
        image_payloads(
            "multipart/form-data; boundary=b",
            b'--b\r\nContent-Disposition: form-data; name="image"\r\n\r\nJPEG\r\n--b--\r\n',
            max_files=4,
        )
