# CPU cost (user+sys, min of 3) of the page-cache primitives a migration target could use to fill guest RAM, 1 GiB each.
# Run: python3 page-cache-primitives.py  (output next to it: page-cache-primitives.txt)
import os, socket, threading, time, resource, mmap
MiB=1<<20; GiB=1<<30
def cpu():
    r=resource.getrusage(resource.RUSAGE_SELF); return r.ru_utime+r.ru_stime
buf=os.urandom(MiB)
def m(name,f):
    best=None
    for _ in range(3):
        c=cpu(); f(); c=cpu()-c
        best=c if best is None else min(best,c)
    print(f"{name:55s} cpu {best*1000:6.0f} ms/GiB (min of 3)",flush=True)
def fresh():
    fd=os.memfd_create("x"); os.ftruncate(fd,GiB); return fd
def pw():
    fd=fresh()
    for off in range(0,GiB,MiB): os.pwrite(fd,buf,off)
    os.close(fd)
m("pwrite 1 MiB into fresh memfd (alloc+copy)",pw)
def fa():
    fd=fresh(); os.posix_fallocate(fd,0,GiB); os.close(fd)
m("fallocate (alloc+zero)",fa)
def fapw():
    fd=fresh(); os.posix_fallocate(fd,0,GiB)
    for off in range(0,GiB,MiB): os.pwrite(fd,buf,off)
    os.close(fd)
m("fallocate + pwrite",fapw)
def pop():
    fd=fresh(); mm=mmap.mmap(fd,GiB); mm.madvise(23); mm.close(); os.close(fd)
m("MADV_POPULATE_WRITE on fresh mapping (alloc+zero+map)",pop)
def popcopy():
    fd=fresh(); mm=mmap.mmap(fd,GiB); mm.madvise(23)
    mv=memoryview(mm)
    for off in range(0,GiB,MiB): mv[off:off+MiB]=buf
    mv.release(); mm.close(); os.close(fd)
m("POPULATE_WRITE + memcpy into mapping",popcopy)
def copyonly():
    b=bytearray(MiB); mv=memoryview(b)
    for off in range(0,GiB,MiB): mv[:]=buf
m("memcpy 1 MiB x1024 (cache-hot, lower bound of a copy)",copyonly)
