"""py-consul (PyPI), unmodified, against quorate with etcd auth on: the client's `token` is a
static token bound to a user whose role may write the registry's `orders` service only.
Usage: consul_acl.py <http port> <token>; prints one line per step and exits 0 when every check holds."""
import sys

import consul

port, token = int(sys.argv[1]), sys.argv[2]
c = consul.Consul(host="127.0.0.1", port=port, token=token)
assert c.agent.service.register("orders", service_id="orders-py", address="10.9.0.1", port=8080,
                                check=consul.Check.ttl("10s"))
c.agent.check.ttl_pass("service:orders-py")
index, nodes = c.health.service("orders", passing=True)
assert "orders-py" in [n["Service"]["ID"] for n in nodes], nodes
print("registered, passed and discovered orders-py with the token")

try:
    c.agent.service.register("payments", service_id="payments-py", address="10.9.0.2", port=8080)
    raise SystemExit("registered payments, which the role does not allow")
except consul.ACLPermissionDenied as e:
    print("payments refused:", e)

try:
    c.health.service("payments")
    raise SystemExit("read payments, which the role does not allow")
except consul.ACLPermissionDenied as e:
    print("payments discovery refused:", e)

anonymous = consul.Consul(host="127.0.0.1", port=port)
try:
    anonymous.health.service("orders")
    raise SystemExit("an anonymous client read orders")
except consul.ConsulException as e:
    print("anonymous refused:", e)
print("OK")
