# registry-mirror in a container:
#   docker build -t registry-mirror .
#   docker run -d -p 5000:5000 -v mirror-cache:/var/cache/registry-mirror registry-mirror
FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /var/cache/registry-mirror mirror \
 && install -d -o mirror -m 0750 /var/cache/registry-mirror \
 && install -d /etc/registry-mirror
COPY . /src
RUN pip install --no-cache-dir '/src[cluster]' \
 && install -m 0644 /src/conf/mirror.yaml /etc/registry-mirror/mirror.yaml \
 && rm -rf /src
USER mirror
ENV REGISTRY_MIRROR_LOG_FORMAT=json
EXPOSE 5000
VOLUME /var/cache/registry-mirror
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/healthz', timeout=3)"
ENTRYPOINT ["registry-mirror"]
CMD ["serve", "--config", "/etc/registry-mirror/mirror.yaml"]
