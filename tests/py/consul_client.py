"""py-consul (PyPI), unmodified, against quorate's Consul endpoints: register with a TTL
check, pass it, a blocking health query that wakes on a change, deregister.
Usage: consul_client.py <http port>; prints one line per step and exits 0 when every check holds."""
import sys
import threading
import time

import consul

c = consul.Consul(host="127.0.0.1", port=int(sys.argv[1]))
assert c.status.leader(), "a leader is known"

assert c.agent.service.register("py-web", service_id="py-web-1", address="10.9.0.1", port=8080,
                                tags=["py"], check=consul.Check.ttl("10s"))
print("registered py-web-1 with a 10s TTL check")
index, nodes = c.health.service("py-web", passing=True)
assert nodes == [], "a TTL check is critical until its first pass"
c.agent.check.ttl_pass("service:py-web-1")
index, nodes = c.health.service("py-web", passing=True)
assert [n["Service"]["ID"] for n in nodes] == ["py-web-1"], nodes
print("passing after ttl_pass, index", index)


def register_later():
    time.sleep(1)
    c.agent.service.register("py-web", service_id="py-web-2", address="10.9.0.2", port=8080,
                             check=consul.Check.ttl("10s"))


threading.Thread(target=register_later).start()
started = time.time()
index2, nodes = c.health.service("py-web", index=index, wait="20s")
waited = time.time() - started
assert 0.5 < waited < 15, waited
assert int(index2) > int(index), (index, index2)
assert sorted(n["Service"]["ID"] for n in nodes) == ["py-web-1", "py-web-2"], nodes
print("blocking query woke after %.1fs with index %s" % (waited, index2))

assert "py-web-1" in c.agent.services()
assert c.catalog.services()[1].get("py-web") == ["py"], c.catalog.services()
assert c.agent.service.deregister("py-web-1")
assert c.agent.service.deregister("py-web-2")
assert c.health.service("py-web")[1] == []
print("deregistered: OK")
