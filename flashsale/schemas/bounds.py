"""Every input bound of the HTTP contract, declared once.

The request shapes (flashsale/schemas/bodies.py) and the id checks
(flashsale/validate.py) enforce them, the OpenAPI document
(flashsale/web/openapi.py) states them, and the core imports the ones it
also guards (e.g. the stock ceiling of a restock). Patterns are written as
ECMA-262 (the OpenAPI dialect); Python matches them with ``.fullmatch()``
(in Python ``$`` would also match before a trailing newline).
"""

from __future__ import annotations

from typing import Final

# the whole raw body of any request (larger: 400 invalid_request, before it is read)
MAX_BODY_BYTES: Final = 16 * 1024

# orders and restocks: units per request
MAX_QUANTITY: Final = 1_000_000

# sales
MAX_PRICE_CENTS: Final = 1_000_000_000
MAX_STOCK: Final = 1_000_000_000  # total ever loaded, restocks included
MAX_PER_USER_LIMIT: Final = 1_000_000
MAX_HOLD_SECONDS: Final = 30 * 86_400
DEFAULT_PER_USER_LIMIT: Final = 1
DEFAULT_HOLD_SECONDS: Final = 600
SKU_MAX_CHARS: Final = 64
NAME_MAX_CHARS: Final = 200
TIMESTAMP_MAX_CHARS: Final = 40
TIMESTAMP_YEARS: Final = (2000, 9000)

# a sale's waiting room (contract v1.1, flashsale/room/)
ROOM_ADMIT_PER_S: Final = (1, 100_000)
ROOM_PASS_SECONDS: Final = (10, 3600)
ROOM_PASS_SECONDS_DEFAULT: Final = 300
ROOM_OVERSUBSCRIBE: Final = (1, 10)
ROOM_OVERSUBSCRIBE_DEFAULT: Final = 2.0
ROOM_PASS_MAX_CHARS: Final = 512  # the Flashsale-Pass header
ROOM_POLL_AFTER_MS: Final = (1000, 30_000)

# the payment gateway's webhook event
EVENT_ID_MAX_CHARS: Final = 200
REFERENCE_MAX_CHARS: Final = 80  # the event's payment_id and order_id
MAX_AMOUNT_CENTS: Final = 10**15

# a character human text may not contain (sku, name, the webhook's ids)
CONTROL_CHARACTER: Final = r"[\x00-\x1f\x7f]"

# ids: what the server makes, and what a path parameter may be at all (anything
# else in a path is 404, as for an unknown id)
SALE_ID_PATTERN: Final = r"^sl_[a-z0-9]{12}$"
ORDER_ID_PATTERN: Final = r"^(sl_[a-z0-9]{12})-[0-9a-f]{21}$"
PAYMENT_ID_PATTERN: Final = r"^pay_[0-9a-f]{24}$"
PATH_ID_PATTERN: Final = r"^[A-Za-z0-9_.-]{1,80}$"
PATH_ID_MAX_CHARS: Final = 80

# headers
IDEMPOTENCY_KEY_PATTERN: Final = r"^[\x21-\x7e](?:[\x20-\x7e]{0,126}[\x21-\x7e])?$"
IDEMPOTENCY_KEY_MAX_CHARS: Final = 128
SIGNATURE_PATTERN: Final = r"^t=[0-9]+,v1=[0-9a-fA-F]{64}$"
USER_ID_MAX_CHARS: Final = 64  # the buyer JWT's ``sub``

# the error envelope's code
ERROR_CODE_PATTERN: Final = r"^[a-z][a-z0-9_]*$"
