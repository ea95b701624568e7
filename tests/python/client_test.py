"""The Python client test of thumbup: a product team's client, made with
grpcio and stubs that grpcio-tools generates from proto/ in this run, calls
every RPC of a running service the way the README's example does (tenant and
bearer token in metadata) and checks each reply; it lists the services
through server reflection, v1alpha (grpcio-reflection's own client) and v1.

Run by tests/tests/python_client.rs against the e2e World with a job
applying the tenant's stream:

    python client_test.py --addr 127.0.0.1:PORT --tenant T --token TOK \
        --business 1 --proto-dir proto [--ca-file ca.crt]

The tenant must be fresh (no likes yet). Exits 0 when every check holds,
else prints the failed check and exits 1.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

SERVICES = {
    "thumbup.v1.Thumbup",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
}


def check(ok, what):
    """Fails the test with `what` unless `ok`; prints it when it holds."""
    if not ok:
        raise AssertionError(what)
    print(f"ok: {what}", flush=True)


def generate_stubs(proto_dir):
    """Generates thumbup.v1's Python stubs from proto/ into a temp dir and
    imports them."""
    out = tempfile.mkdtemp(prefix="thumbup-py-stubs-")
    proto = os.path.join(proto_dir, "thumbup", "v1", "thumbup.proto")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{proto_dir}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            proto,
        ],
        check=True,
    )
    sys.path.insert(0, out)
    from thumbup.v1 import thumbup_pb2, thumbup_pb2_grpc

    print(f"stubs generated from {proto} into {out}", flush=True)
    return thumbup_pb2, thumbup_pb2_grpc


class Client:
    """The stub, with every call sending the tenant and its bearer token, as
    the README's example does."""

    def __init__(self, channel, pb, pb_grpc, tenant, token):
        self.stub = pb_grpc.ThumbupStub(channel)
        self.pb = pb
        self.metadata = [("x-thumbup-tenant", tenant), ("authorization", f"Bearer {token}")]
        self.called = set()

    def call(self, rpc, request, metadata=None):
        self.called.add(rpc)
        md = self.metadata if metadata is None else metadata
        return getattr(self.stub, rpc)(request, metadata=md, timeout=10)

    def status_of(self, rpc, request, metadata=None):
        """The status code of a call that must fail."""
        try:
            reply = self.call(rpc, request, metadata)
        except grpc.RpcError as e:
            return e.code()
        raise AssertionError(f"{rpc}({request}) succeeded: {reply}")

    def like(self, biz, msg, mid, up, action):
        req = self.pb.LikeRequest(business_id=biz, message_id=msg, mid=mid, up_mid=up, action=action)
        return self.call("Like", req)

    def counts(self, biz, msgs):
        reply = self.call("GetCounts", self.pb.GetCountsRequest(business_id=biz, message_ids=msgs))
        return {m: (c.likes, c.dislikes) for m, c in reply.counts.items()}


def reflection_services_v1alpha(channel):
    """Services listed by grpcio-reflection's client (v1alpha)."""
    return set(ProtoReflectionDescriptorDatabase(channel).get_services())


def reflection_services_v1(channel):
    """Services listed through grpc.reflection.v1. Its messages are those
    of v1alpha field for field (grpcio-reflection ships v1alpha's only), so
    v1alpha's classes encode and decode them."""
    info = channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    replies = list(info(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
    check(len(replies) == 1, f"reflection v1 answers list_services once ({len(replies)} replies)")
    return {s.name for s in replies[0].list_services_response.service}


def check_reflection(channel, pb):
    got = reflection_services_v1alpha(channel)
    check(got == SERVICES, f"reflection v1alpha lists {sorted(SERVICES)} (got {sorted(got)})")
    got = reflection_services_v1(channel)
    check(got == SERVICES, f"reflection v1 lists {sorted(SERVICES)} (got {sorted(got)})")

    # The API that reflection describes is the one of proto/.
    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    served = pool.FindServiceByName("thumbup.v1.Thumbup")
    want = pb.DESCRIPTOR.services_by_name["Thumbup"]
    names = lambda s: sorted(m.name for m in s.methods)  # noqa: E731
    check(names(served) == names(want), f"reflection describes the RPCs of proto/: {names(served)}")

    # A client with no stubs, only reflection's descriptors (as grpcurl):
    # the health check of the API says SERVING.
    req_type = message_factory.GetMessageClass(pool.FindMessageTypeByName("grpc.health.v1.HealthCheckRequest"))
    reply_type = message_factory.GetMessageClass(pool.FindMessageTypeByName("grpc.health.v1.HealthCheckResponse"))
    check_rpc = channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=req_type.SerializeToString,
        response_deserializer=reply_type.FromString,
    )
    reply = check_rpc(req_type(service="thumbup.v1.Thumbup"), timeout=10)
    serving = reply_type.DESCRIPTOR.fields_by_name["status"].enum_type.values_by_name["SERVING"].number
    check(reply.status == serving, f"health of thumbup.v1.Thumbup through reflection's types is SERVING ({reply})")


def wait_counts(c, biz, want, deadline_s=60):
    """Waits until the job has applied and GetCounts reads `want` exactly."""
    deadline = time.monotonic() + deadline_s
    while True:
        got = c.counts(biz, sorted(want))
        if got == want:
            check(True, f"GetCounts after the job applied: {got}")
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"GetCounts still {got} after {deadline_s} s, want {want}")
        time.sleep(0.1)


def check_api(c, biz):
    pb = c.pb
    up = 50
    # Writes: user 1 likes items 1, 2 and 3, user 2 likes item 1, user 3
    # dislikes item 1 (all owned by user 50). Each reply has the new state
    # and the item's counts (applied so far plus this action).
    # (item, user, action, the state it leads to)
    actions = [
        (1, 1, pb.ACTION_LIKE, pb.STATE_LIKE),
        (2, 1, pb.ACTION_LIKE, pb.STATE_LIKE),
        (3, 1, pb.ACTION_LIKE, pb.STATE_LIKE),
        (1, 2, pb.ACTION_LIKE, pb.STATE_LIKE),
        (1, 3, pb.ACTION_DISLIKE, pb.STATE_DISLIKE),
    ]
    likes_so_far, dislikes_so_far = {}, {}
    for msg, mid, action, state in actions:
        r = c.like(biz, msg, mid, up, action)
        if state == pb.STATE_LIKE:
            likes_so_far[msg] = likes_so_far.get(msg, 0) + 1
        else:
            dislikes_so_far[msg] = dislikes_so_far.get(msg, 0) + 1
        likes, dislikes = likes_so_far.get(msg, 0), dislikes_so_far.get(msg, 0)
        # The first action on an item counts exactly itself; later ones at
        # least themselves and at most every action so far.
        ok_likes = (1 if state == pb.STATE_LIKE else 0) <= r.counts.likes <= likes
        ok_dislikes = (1 if state == pb.STATE_DISLIKE else 0) <= r.counts.dislikes <= dislikes
        check(
            r.state == state and r.version > 0 and ok_likes and ok_dislikes,
            f"Like item {msg} by user {mid}: state {pb.State.Name(r.state)}, counts "
            f"({r.counts.likes}, {r.counts.dislikes}), version {r.version}",
        )
    # A double click changes nothing: liking again is refused.
    code = c.status_of("Like", pb.LikeRequest(business_id=biz, message_id=1, mid=1, up_mid=up, action=pb.ACTION_LIKE))
    check(code == grpc.StatusCode.FAILED_PRECONDITION, f"a second LIKE of the same item is {code}")

    wait_counts(c, biz, {1: (2, 1), 2: (1, 0), 3: (1, 0)})

    r = c.call("GetStates", pb.GetStatesRequest(business_id=biz, mid=1, message_ids=[1, 2, 3, 4]))
    want = {1: pb.STATE_LIKE, 2: pb.STATE_LIKE, 3: pb.STATE_LIKE, 4: pb.STATE_NONE}
    check(dict(r.states) == want, f"GetStates of user 1: {dict(r.states)}")
    r = c.call("GetStates", pb.GetStatesRequest(business_id=biz, mid=3, message_ids=[1]))
    check(dict(r.states) == {1: pb.STATE_DISLIKE}, f"GetStates of user 3: {dict(r.states)}")

    # User 1's likes, newest first, in pages of two: items 3 and 2, then 1.
    p1 = c.call("ListUserLikes", pb.ListUserLikesRequest(business_id=biz, mid=1, page_size=2))
    check([i.message_id for i in p1.items] == [3, 2] and p1.next_page_token, f"ListUserLikes page 1: {p1.items}")
    p2 = c.call(
        "ListUserLikes",
        pb.ListUserLikesRequest(business_id=biz, mid=1, page_size=2, page_token=p1.next_page_token),
    )
    check([i.message_id for i in p2.items] == [1] and not p2.next_page_token, f"ListUserLikes page 2: {p2.items}")
    check(all(i.liked_at_ms > 0 for i in [*p1.items, *p2.items]), "liked items carry their time")

    # Item 1's likers, newest first: users 2 and 1.
    r = c.call("ListItemLikers", pb.ListItemLikersRequest(business_id=biz, message_id=1, page_size=10))
    check([l.mid for l in r.likers] == [2, 1] and not r.next_page_token, f"ListItemLikers of item 1: {r.likers}")

    r = c.call("GetReceivedLikes", pb.GetReceivedLikesRequest(business_id=biz, up_mid=up))
    check(r.likes == 4, f"GetReceivedLikes of user {up}: {r.likes}")

    # Undo: user 2 unlikes item 1, user 3 undislikes it.
    r = c.like(biz, 1, 2, up, pb.ACTION_UNLIKE)
    check(r.state == pb.STATE_NONE, f"UNLIKE: state {pb.State.Name(r.state)}")
    r = c.like(biz, 1, 3, up, pb.ACTION_UNDISLIKE)
    check(r.state == pb.STATE_NONE, f"UNDISLIKE: state {pb.State.Name(r.state)}")
    wait_counts(c, biz, {1: (1, 0), 2: (1, 0), 3: (1, 0)})
    r = c.call("GetReceivedLikes", pb.GetReceivedLikesRequest(business_id=biz, up_mid=up))
    check(r.likes == 3, f"GetReceivedLikes of user {up} after the unlike: {r.likes}")


def check_bad_input(c, biz, tenant):
    pb = c.pb
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    cases = [
        ("Like", pb.LikeRequest(business_id=biz, message_id=1, mid=0, up_mid=5, action=pb.ACTION_LIKE), invalid),
        ("Like", pb.LikeRequest(business_id=biz, message_id=1, mid=9, up_mid=5), invalid),
        ("Like", pb.LikeRequest(business_id=biz, message_id=-1, mid=9, up_mid=5, action=pb.ACTION_LIKE), invalid),
        ("GetStates", pb.GetStatesRequest(business_id=biz, mid=1, message_ids=[]), invalid),
        ("GetCounts", pb.GetCountsRequest(business_id=biz, message_ids=list(range(1, 102))), invalid),
        ("GetCounts", pb.GetCountsRequest(business_id=biz, message_ids=[0]), invalid),
        ("ListUserLikes", pb.ListUserLikesRequest(business_id=biz, mid=1, page_size=0), invalid),
        ("ListUserLikes", pb.ListUserLikesRequest(business_id=biz, mid=1, page_size=1, page_token="zz"), invalid),
        ("ListItemLikers", pb.ListItemLikersRequest(business_id=biz, message_id=1, page_size=101), invalid),
        ("GetReceivedLikes", pb.GetReceivedLikesRequest(business_id=biz, up_mid=0), invalid),
        ("GetCounts", pb.GetCountsRequest(business_id=999, message_ids=[1]), grpc.StatusCode.NOT_FOUND),
    ]
    for rpc, req, want in cases:
        code = c.status_of(rpc, req)
        shown = " ".join(str(req).split())
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        check(code == want, f"{rpc}({shown}) is {code}")

    # Every RPC refuses a wrong token, another tenant and no metadata alike.
    requests = {
        "Like": pb.LikeRequest(business_id=biz, message_id=1, mid=1, up_mid=5, action=pb.ACTION_LIKE),
        "GetStates": pb.GetStatesRequest(business_id=biz, mid=1, message_ids=[1]),
        "GetCounts": pb.GetCountsRequest(business_id=biz, message_ids=[1]),
        "ListUserLikes": pb.ListUserLikesRequest(business_id=biz, mid=1, page_size=1),
        "ListItemLikers": pb.ListItemLikersRequest(business_id=biz, message_id=1, page_size=1),
        "GetReceivedLikes": pb.GetReceivedLikesRequest(business_id=biz, up_mid=5),
    }
    refused = {
        "a wrong token": [("x-thumbup-tenant", tenant), ("authorization", "Bearer not-the-token-0001")],
        "an unknown tenant": [("x-thumbup-tenant", "nosuch-tenant"), ("authorization", "Bearer not-the-token-0001")],
        "no token": [("x-thumbup-tenant", tenant)],
        "no metadata": [],
    }
    for rpc, req in requests.items():
        for who, md in refused.items():
            code = c.status_of(rpc, req, md)
            check(code == grpc.StatusCode.UNAUTHENTICATED, f"{rpc} with {who} is {code}")
    # Nothing of that changed a count.
    check(c.counts(biz, [1, 2]) == {1: (1, 0), 2: (1, 0)}, "the refused calls changed no count")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--addr", required=True, help="host:port of the service")
    ap.add_argument("--tenant", required=True)
    ap.add_argument("--token", required=True)
    ap.add_argument("--business", type=int, default=1)
    ap.add_argument("--proto-dir", required=True, help="the repository's proto/")
    ap.add_argument("--ca-file", help="TLS: the CA of the service's certificate (plaintext without)")
    args = ap.parse_args()

    pb, pb_grpc = generate_stubs(args.proto_dir)
    # The service is local: no HTTP proxy from the environment in between.
    options = [("grpc.enable_http_proxy", 0)]
    if args.ca_file:
        with open(args.ca_file, "rb") as f:
            creds = grpc.ssl_channel_credentials(root_certificates=f.read())
        channel = grpc.secure_channel(args.addr, creds, options=options)
    else:
        channel = grpc.insecure_channel(args.addr, options=options)
    with channel:
        check_reflection(channel, pb)
        c = Client(channel, pb, pb_grpc, args.tenant, args.token)
        check_api(c, args.business)
        check_bad_input(c, args.business, args.tenant)
        every = {m.name for m in pb.DESCRIPTOR.services_by_name["Thumbup"].methods}
        check(c.called == every, f"every RPC of thumbup.v1.Thumbup was called: {sorted(c.called)}")
    print("python client test: all checks passed", flush=True)


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print(f"FAILED: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
