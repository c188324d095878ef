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
print("deregistered")

# KV over the same keyspace as etcd's API, with CAS, sessions and locks.
assert c.kv.put("py/cfg/a", "1") and c.kv.put("py/cfg/b", "2")
index, entry = c.kv.get("py/cfg/a")
assert entry["Value"] == b"1", entry
assert not c.kv.put("py/cfg/a", "x", cas=entry["ModifyIndex"] - 1), "a stale CAS is refused"
assert c.kv.put("py/cfg/a", "3", cas=entry["ModifyIndex"])
assert not c.kv.put("py/cfg/a", "y", cas=0), "cas=0 only creates"
assert [e["Key"] for e in c.kv.get("py/cfg/", recurse=True)[1]] == ["py/cfg/a", "py/cfg/b"]
s1 = c.session.create(name="holder-1", ttl=10)
s2 = c.session.create(name="holder-2", ttl=10)
assert c.kv.put("py/lock", "1", acquire=s1)
assert not c.kv.put("py/lock", "2", acquire=s2), "a held lock is not granted to another session"
assert c.kv.get("py/lock")[1]["Session"] == s1
assert not c.kv.put("py/lock", "2", release=s2), "only the holder releases"
assert c.kv.put("py/lock", "1", release=s1)
assert c.kv.put("py/lock", "2", acquire=s2)
assert c.session.info(s1)[1]["Name"] == "holder-1"
assert c.session.destroy(s2)
entry = c.kv.get("py/lock")[1]
assert entry is not None and entry["Value"] == b"2" and not entry.get("Session"), \
    "Behavior release (the default): a destroyed session's key stays, unlocked: %r" % (entry,)
assert not c.kv.put("py/lock", "3", acquire=s1), "lock-delay (15 s by default) after the holder's session ended"
s3 = c.session.create(name="ephemeral", ttl=10, behavior="delete")
assert c.kv.put("py/ephemeral", "1", acquire=s3)
assert c.session.destroy(s3)
assert c.kv.get("py/ephemeral")[1] is None, "Behavior delete: the key goes with its session"
assert c.kv.delete("py/cfg/", recurse=True) and c.kv.get("py/cfg/a")[1] is None
print("kv, cas, sessions and locks: OK")
