"""py-eureka-client (PyPI), unmodified, against quorate's Eureka endpoints: register, renew,
fetch (all, delta, one application), cancel; a renew after cancel is a 404.
Usage: eureka_client.py <http port>"""
import asyncio
import sys
import urllib.error

import py_eureka_client.eureka_basic as eb

SERVER = "http://127.0.0.1:%s/eureka" % sys.argv[1]
ID = "10.9.1.1:py-orders:9090"


async def main():
    inst = eb.Instance(instanceId=ID, hostName="10.9.1.1", app="PY-ORDERS", ipAddr="10.9.1.1",
                       port=eb.PortWrapper(port=9090, enabled=True),
                       leaseInfo=eb.LeaseInfo(renewalIntervalInSecs=2, durationInSecs=6),
                       metadata={"version": "7"}, vipAddress="py-orders")
    await eb.register(SERVER, inst)
    print("registered", ID)
    await eb.send_heartbeat(SERVER, "PY-ORDERS", ID, 0)
    print("renewed")
    apps = await eb.get_applications(SERVER)
    found = [(i.instanceId, i.status, i.port.port, i.metadata) for a in apps.applications
             if a.name == "PY-ORDERS" for i in a.instances]
    assert found == [(ID, "UP", 9090, {"version": "7"})], found
    delta = await eb.get_delta(SERVER)
    assert delta.appsHashcode == apps.appsHashcode, (delta.appsHashcode, apps.appsHashcode)
    app = await eb.get_application(SERVER, "PY-ORDERS")
    assert [i.instanceId for i in app.instances] == [ID]
    print("fetched: apps hashcode", apps.appsHashcode)
    await eb.cancel(SERVER, "PY-ORDERS", ID)
    try:
        await eb.send_heartbeat(SERVER, "PY-ORDERS", ID, 0)
        raise AssertionError("a renew after cancel must be refused")
    except urllib.error.HTTPError as e:
        assert e.code == 404, e.code
    print("cancelled; renew answers 404: OK")


asyncio.run(main())
