"""The pinned `openai` Python client against `ultrapixel serve` (tools/serve-clients.sh).

    openai_client.py BASE_URL WIDTHxHEIGHT SEED

Calls images.generate with response_format b64_json exactly as an application would, then
checks that the answer decodes to one PNG of the asked size (PNG signature and IHDR read
here: the check needs no imaging library). Exit 0 when it does, 1 with the reason otherwise.
"""

import base64
import struct
import sys

import openai


def main() -> int:
    base_url, size, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    width, height = (int(s) for s in size.split("x"))
    # The server runs without --token-file here; the client insists on some key.
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)
    result = client.images.generate(
        model="ultrapixel",
        prompt="a lighthouse at dusk",
        size=size,
        n=1,
        response_format="b64_json",
        # Our extra fields (the tiny model, few steps), as the client passes any extension.
        extra_body={"seed": seed, "steps_c": 2, "steps_b": 1},
    )
    if len(result.data) != 1 or not result.data[0].b64_json:
        print(f"expected one b64_json image, got {result!r}"[:500])
        return 1
    png = base64.b64decode(result.data[0].b64_json)
    if png[:8] != b"\x89PNG\r\n\x1a\n" or png[12:16] != b"IHDR":
        print("the image is not a PNG")
        return 1
    got = struct.unpack(">II", png[16:24])
    if got != (width, height):
        print(f"PNG is {got[0]}x{got[1]}, asked {size}")
        return 1
    print(f"openai {openai.__version__}: images.generate gave a {size} PNG ({len(png)} bytes)")
    # A bad request surfaces as the client's own exception type, with our message.
    try:
        client.images.generate(model="ultrapixel", prompt="x", size="1001x512")
    except openai.BadRequestError as e:
        if "nearest valid" not in str(e):
            print(f"400 without the validation message: {e}")
            return 1
    else:
        print("a bad size was accepted")
        return 1
    print("a bad size raised openai.BadRequestError with the server's message")
    return 0


if __name__ == "__main__":
    sys.exit(main())
