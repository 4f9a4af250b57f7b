import pika, time, sys, threading, multiprocessing
N=20000; prefetch=int(sys.argv[1]) if len(sys.argv)>1 else 1024
qt=sys.argv[2] if len(sys.argv)>2 else 'quorum'
params=pika.ConnectionParameters('127.0.0.1')
c=pika.BlockingConnection(params); ch=c.channel()
q='probe.q'
ch.queue_delete(q)
ch.queue_declare(q, durable=True, arguments={'x-queue-type':qt})
body=b'x'*700
cc=pika.BlockingConnection(params); cch=cc.channel(); cch.basic_qos(prefetch_count=prefetch)
start=multiprocessing.Event()
def pub():
    pc=pika.BlockingConnection(params); pch=pc.channel()
    start.wait()
    for i in range(N):
        pch.basic_publish('', q, body, properties=pika.BasicProperties(delivery_mode=2, headers={'k':'a'}))
    pc.close()
probes=[]
def probe():
    pc=pika.BlockingConnection(params); pch=pc.channel(); pch.confirm_delivery()
    start.wait()
    for i in range(40):
        t=time.time()
        pch.basic_publish('', q, b'p', properties=pika.BasicProperties(delivery_mode=2, timestamp=int(t*1e6), headers={'k':'b'}))
        time.sleep(max(0,0.05-(time.time()-t)))
    pc.close()
th=multiprocessing.Process(target=pub); th2=threading.Thread(target=probe); th.start(); th2.start()
t0=time.time(); start.set()
got=0; pending=0; lat=[]
for method, props, b in cch.consume(q, inactivity_timeout=3):
    if method is None: break
    got+=1
    if props.headers['k']=='b': lat.append((round(props.timestamp/1e6-t0,2), round(time.time()*1e3-props.timestamp/1e3,1)))
    pending+=1
    if pending>=256: cch.basic_ack(method.delivery_tag, multiple=True); pending=0
if pending: cch.basic_ack(0, multiple=True)
print(qt, 'prefetch', prefetch, 'got', got, 'in %.2fs'%(time.time()-t0-3))
print(lat)
th.join(); th2.join()
