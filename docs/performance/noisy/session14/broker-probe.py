# Bare-broker probe (session 12's quorum-probe-experiment.py, extended): a
# 20,000-message persistent publish blast into quorum queue probe.blast
# (consumed with one multiple ack per 256), and a probe message every 50 ms on a
# confirmed channel, into the same queue (`same`) or into a queue of its own
# (`other`, consumed by a second consumer), that queue a quorum queue with
# persistent probes (`quorum`, the default) or a classic non-durable one with
# transient probes (`classic`). Usage: broker-probe.py same|other [quorum|classic].
# Prints the probes' publish -> consume latency (ms): p50, worst five, over 50.
import pika, time, sys, threading, multiprocessing
N=20000; mode=sys.argv[1] if len(sys.argv)>1 else 'same'
params=pika.ConnectionParameters('127.0.0.1')
c=pika.BlockingConnection(params); ch=c.channel()
for q in ('probe.blast',):
    ch.queue_delete(q); ch.queue_declare(q, durable=True, arguments={'x-queue-type':'quorum'})
OT=sys.argv[2] if len(sys.argv)>2 else 'quorum'
ch.queue_delete('probe.other'); ch.queue_declare('probe.other', durable=(OT=='quorum'), arguments={'x-queue-type':OT})
body=b'x'*700
pq='probe.blast' if mode=='same' else 'probe.other'
start=multiprocessing.Event()
def pub():
    pc=pika.BlockingConnection(params); pch=pc.channel()
    start.wait()
    for i in range(N):
        pch.basic_publish('', 'probe.blast', body, properties=pika.BasicProperties(delivery_mode=2, headers={'k':'a'}))
    pc.close()
lat=[]
def probe():
    pc=pika.BlockingConnection(params); pch=pc.channel(); pch.confirm_delivery()
    start.wait()
    for i in range(40):
        t=time.time()
        pch.basic_publish('', pq, b'p', properties=pika.BasicProperties(delivery_mode=(2 if OT=='quorum' else 1), timestamp=int(t*1e6), headers={'k':'b'}))
        time.sleep(max(0,0.05-(time.time()-t)))
    pc.close()
def other_consumer():
    oc=pika.BlockingConnection(params); och=oc.channel(); och.basic_qos(prefetch_count=64)
    for method, props, b in och.consume('probe.other', inactivity_timeout=4):
        if method is None: break
        lat.append(round(time.time()*1e3-props.timestamp/1e3,1)); och.basic_ack(method.delivery_tag)
    oc.close()
cc=pika.BlockingConnection(params); cch=cc.channel(); cch.basic_qos(prefetch_count=1024)
th=multiprocessing.Process(target=pub); th2=threading.Thread(target=probe); th.start(); th2.start()
if mode!='same':
    th3=threading.Thread(target=other_consumer); th3.start()
t0=time.time(); start.set()
got=0; pending=0
for method, props, b in cch.consume('probe.blast', inactivity_timeout=3):
    if method is None: break
    got+=1
    if props.headers['k']=='b': lat.append(round(time.time()*1e3-props.timestamp/1e3,1))
    pending+=1
    if pending>=256: cch.basic_ack(method.delivery_tag, multiple=True); pending=0
if pending: cch.basic_ack(0, multiple=True)
th.join(); th2.join()
if mode!='same': th3.join()
s=sorted(lat)
print(mode, 'blast got', got, 'probes', len(s), 'p50', s[len(s)//2], 'worst5', s[-5:][::-1], 'over50', sum(1 for x in s if x>50))
