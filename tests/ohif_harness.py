# Copyright (c) LCA-DB MONAI plugin contributors
# Licensed under the Apache License, Version 2.0 (the "License"); see the repository's LICENSE.
"""Serves OHIF's prebuilt viewer (``tools/fetch_ohif.py``) and proxies its DICOMweb requests to an Orthanc, both on
one loopback origin (no CORS set-up needed in Orthanc)."""

from __future__ import annotations

import http.server
import threading
import urllib.error
import urllib.request
from pathlib import Path

__all__ = ["OHIFServer"]

_CONFIG = """window.config = {{
  routerBasename: '/',
  extensions: [],
  modes: [],
  showStudyList: true,
  maxNumberOfWebWorkers: 1,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  investigationalUseDialog: {{ option: 'never' }},
  strictZSpacingForVolumeViewport: false,
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {{
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {{
        friendlyName: 'Orthanc on loopback',
        name: 'orthanc',
        wadoUriRoot: '{root}',
        qidoRoot: '{root}',
        wadoRoot: '{root}',
        qidoSupportsIncludeField: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        omitQuotationForMultipartRequest: true,
        bulkDataURI: {{ enabled: true }},
      }},
    }},
  ],
}};
"""


class OHIFServer:
    """``dist`` served at ``http://127.0.0.1:<port>/``, ``/dicom-web/...`` forwarded to ``orthanc_dicomweb``."""

    def __init__(self, dist: Path, orthanc_dicomweb: str):
        self.dist = Path(dist)
        self.upstream = orthanc_dicomweb.rstrip("/")
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(server.dist), **kwargs)

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):  # noqa: N802 - http.server's naming
                path = self.path.split("?", 1)[0]
                if path.startswith("/dicom-web/"):
                    return self._proxy()
                if path == "/app-config.js":
                    body = _CONFIG.format(root=f"{server.url}/dicom-web").encode()
                    return self._send(200, "application/javascript", body)
                if not (server.dist / path.lstrip("/")).is_file():
                    self.path = "/index.html"  # the viewer's client-side routes
                return super().do_GET()

            def _proxy(self):
                url = server.upstream + self.path[len("/dicom-web") :]
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("accept", "content-type")}
                request = urllib.request.Request(url, headers=headers)
                try:
                    with urllib.request.urlopen(request, timeout=120) as response:  # noqa: S310 - loopback
                        self._send(response.status, response.headers.get("Content-Type", ""), response.read())
                except urllib.error.HTTPError as err:
                    self._send(err.code, err.headers.get("Content-Type", "text/plain"), err.read())

            def _send(self, status: int, content_type: str, body: bytes):
                self.send_response(status)
                if content_type:
                    self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.httpd.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> OHIFServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
