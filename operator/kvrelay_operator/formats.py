"""String formats a DisaggregatedModel's fields must have, as regular expressions.

Each is written once and used twice: as the CRD schema's `pattern` (the API server refuses a bad
value at admission, in the field's own name) and by pydantic in the operator. The grammars are
Kubernetes' and the OCI distribution spec's; the expressions are ours.
"""

from __future__ import annotations

from decimal import Decimal

# resource.Quantity as Kubernetes serialises it: a decimal number, then a binary (Ki..Ei) or decimal
# (n, u, m, k, M, G, T, P, E) suffix or an exponent. No sign: requests and limits cannot be negative.
QUANTITY = (
    r"^(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)

# A DNS-1123 label (Service names, label values' strictest form) and subdomain (most object names).
_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_SUBDOMAIN = rf"{_LABEL}(\.{_LABEL})*"
DNS_SUBDOMAIN = rf"^{_SUBDOMAIN}$"
# A qualified name's name part (after an optional DNS prefix and '/').
_QUALIFIED = r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?"
# A resource name in requests/limits: `cpu`, `memory`, `hugepages-2Mi`, `example.com/foo`.
RESOURCE_NAME = rf"^({_SUBDOMAIN}/)?{_QUALIFIED}$"
# An extended resource (device plugin): always domain-prefixed.
EXTENDED_RESOURCE_NAME = rf"^{_SUBDOMAIN}/{_QUALIFIED}$"
# A label key (optional DNS prefix, then a name of at most 63 characters) and a label value.
LABEL_KEY = rf"^({_SUBDOMAIN}/)?[A-Za-z0-9]([-A-Za-z0-9_.]{{0,61}}[A-Za-z0-9])?$"
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$"
# A key in a Secret or ConfigMap.
CONFIG_KEY = r"^[-._a-zA-Z0-9]+$"
# An environment variable name: printable ASCII without '=' (what Kubernetes accepts since 1.34).
ENV_NAME = r"^[!-<>-~][ -<>-~]*$"

# An image reference (OCI distribution grammar): [registry[:port]/]repository[:tag][@digest].
# The registry is told from the first path component by a dot, a port or `localhost`; the
# repository's components are lowercase.
_HOST_PART = r"[a-zA-Z0-9]([-a-zA-Z0-9]*[a-zA-Z0-9])?"
_REGISTRY = rf"(localhost(:[0-9]+)?|{_HOST_PART}(\.{_HOST_PART})+(:[0-9]+)?|{_HOST_PART}:[0-9]+)"
_PATH_PART = r"[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*"
IMAGE = (
    rf"^({_REGISTRY}/)?{_PATH_PART}(/{_PATH_PART})*"
    r"(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?"
    r"(@[A-Za-z][A-Za-z0-9]*([-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?$"
)

# A model source, one of three schemes (resources.py reads it the same way):
# - a Hugging Face repo id, `org/name` or a bare legacy `name` (letters, digits, `-`, `_`, `.`);
# - `pvc://<claim>/<path inside it>` (the path may be empty: the claim's root is the checkpoint);
# - an absolute path inside the worker image.
# No `..` path segment in either path: it would leave the claim or the model directory. (Written
# without look-arounds: the API server's RE2 and pydantic's Rust regex have none.)
_HF_PART = r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?"
_SEGMENT = r"([^/\s.][^/\s]*|\.([^/\s.][^/\s]*)?|\.\.[^/\s]+)"  # any path segment but `..`
_PATH = rf"{_SEGMENT}(/{_SEGMENT})*/?"
MODEL_SOURCE = rf"^(({_HF_PART}/)?{_HF_PART}|pvc://{_SUBDOMAIN}(/({_PATH})?)?|/{_PATH})$"

# A memory size in binary units (shmSize) and a Prometheus duration (scrape interval).
BINARY_SIZE = r"^[0-9]+(Ki|Mi|Gi|Ti)?$"
DURATION = r"^[0-9]+(ms|s|m)$"

# An http(s) URL with a host.
HTTP_URL = r"^https?://[^\s/?#@]+(:[0-9]+)?([/?#]\S*)?$"

# An IPv4 or IPv6 CIDR, by shape only (the API server checks the address when it admits the
# NetworkPolicy; CEL's isCIDR needs Kubernetes 1.31 and the chart supports 1.30).
CIDR = r"^(([0-9]{1,3}\.){3}[0-9]{1,3}/[0-9]{1,2}|[0-9a-fA-F.]*:[0-9a-fA-F:.]*/[0-9]{1,3})$"

# A DisaggregatedModel's name: its Services are `<name>-prefill|decode|router`, and a Service name is
# a DNS-1035 label (a letter first, at most 63 characters). "-prefill" is the longest suffix (8).
LONGEST_CHILD_SUFFIX = "-prefill"
MAX_NAME_LENGTH = 63 - len(LONGEST_CHILD_SUFFIX)
NAME = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"


# Each pattern in words, for the API server's messages and the CRD's descriptions (`kubectl explain`).
PATTERN_NAMES = {
    QUANTITY: "a quantity (4, 500m, 16Gi, 1e3; not negative)",
    DNS_SUBDOMAIN: "a DNS-1123 subdomain (lowercase letters, digits, '-' and '.')",
    RESOURCE_NAME: "a resource name (cpu, memory, hugepages-2Mi, example.com/foo)",
    EXTENDED_RESOURCE_NAME: "an extended resource name (domain/name, e.g. rdma/ib)",
    LABEL_KEY: "a label key ([DNS-subdomain prefix/]name, the name at most 63 characters)",
    LABEL_VALUE: "a label value (at most 63 letters, digits, '-', '_' or '.', alphanumeric at both ends)",
    CONFIG_KEY: "a Secret key (letters, digits, '-', '_' and '.')",
    ENV_NAME: "printable ASCII without '='",
    IMAGE: "an image reference ([registry[:port]/]repository[:tag][@digest], repository lowercase)",
    MODEL_SOURCE: "a Hugging Face repo id, pvc://<claim>[/<path>] or an absolute path, without '..'",
    HTTP_URL: "an http or https URL with a host",
    CIDR: "an IPv4 or IPv6 CIDR (10.0.0.0/8, fd00::/8)",
    BINARY_SIZE: "a size in bytes or Ki, Mi, Gi, Ti (8Gi)",
    DURATION: "a duration in ms, s or m (15s)",
}


_SUFFIXES = {
    **{k: Decimal(1024) ** (i + 1) for i, k in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"))},
    **{k: Decimal(10) ** e for k, e in (("n", -9), ("u", -6), ("m", -3), ("", 0), ("k", 3), ("M", 6),
                                        ("G", 9), ("T", 12), ("P", 15), ("E", 18))},
}  # fmt: skip


def quantity_value(quantity: int | str) -> Decimal:
    """The number a QUANTITY-shaped value stands for (16Gi -> 17179869184, 500m -> 0.5, 1e3 -> 1000).

    Kept here rather than taken from the kubernetes client, whose import pulls in the API client that
    this pure layer must not depend on (see .importlinter).
    """
    text = str(quantity)
    for suffix in ("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"):
        if text.endswith(suffix):
            return Decimal(text[: -len(suffix)]) * _SUFFIXES[suffix]
    if text[-1:] in _SUFFIXES:  # a decimal suffix (an exponent always ends in a digit)
        return Decimal(text[:-1]) * _SUFFIXES[text[-1]]
    return Decimal(text)  # a plain number, or one with an exponent (1e3, 2E6)
