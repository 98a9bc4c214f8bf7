{{/*
The kvrelay alert rules as a Prometheus rules document (`groups:`). Rendered into a PrometheusRule
(Prometheus Operator) and, on request, into a ConfigMap holding a plain rules file; the tests feed
the latter to `promtool check rules` and `promtool test rules`.
Only metric names of docs/wire-contracts.md section 4 (plus Prometheus' own `up`) are used.
*/}}
{{- define "kvrelay.alertGroups" -}}
{{- $a := .Values.alerts }}
{{- $q := $a.slo.quantile }}
{{- $router := `role!~"prefill|decode"` }}
{{- $ttft := printf "histogram_quantile(%v, sum by (model, le) (rate(kvrelay_time_to_first_token_seconds_bucket{%s}" $q $router }}
{{- $itl := printf "histogram_quantile(%v, sum by (model, le) (rate(kvrelay_inter_token_latency_seconds_bucket{%s}" $q $router }}
{{- $runbook := $a.runbookUrl -}}
groups:
  - name: kvrelay-slo
    rules:
      # Multi-window check: the short window catches it quickly, the long one ignores blips.
      - alert: KvrelayTTFTSLOBurn
        expr: |-
          {{ $ttft }}[5m]))) > {{ $a.slo.ttftSeconds }}
          and
          {{ $ttft }}[1h]))) > {{ $a.slo.ttftSeconds }}
        for: 5m
        labels:
          severity: critical
        annotations:
          summary: {{ printf "Time to first token p%v of %s is above the %vs SLO" (mulf $q 100) `{{ $labels.model }}` $a.slo.ttftSeconds | quote }}
          description: {{ printf "TTFT p%v has been %s over both the last 5m and 1h. Check the Pools dashboard: queued prefill tokens, prefill replicas at max, KV transfer latency." (mulf $q 100) `{{ $value | humanizeDuration }}` | quote }}
          {{- with $runbook }}
          runbook_url: {{ printf "%s#kvrelayttftsloburn" . | quote }}
          {{- end }}
      - alert: KvrelayITLSLOBurn
        expr: |-
          {{ $itl }}[5m]))) > {{ $a.slo.itlSeconds }}
          and
          {{ $itl }}[1h]))) > {{ $a.slo.itlSeconds }}
        for: 5m
        labels:
          severity: critical
        annotations:
          summary: {{ printf "Inter-token latency p%v of %s is above the %vs SLO" (mulf $q 100) `{{ $labels.model }}` $a.slo.itlSeconds | quote }}
          description: {{ printf "ITL p%v has been %s over both the last 5m and 1h. Check decode replicas, running sequences and KV-cache use." (mulf $q 100) `{{ $value | humanizeDuration }}` | quote }}
          {{- with $runbook }}
          runbook_url: {{ printf "%s#kvrelayitlsloburn" . | quote }}
          {{- end }}
      # The autoscaler wanted more but a bound (maxReplicas, ratio, GPU budget) stopped it, while the
      # SLO is violated: only a person can help (raise the bound or add GPUs).
      - alert: KvrelayPoolAtMaxWhileSLOViolated
        expr: |-
          max by (model, role) (increase(kvrelay_autoscaler_decisions_total{reason=~{{ $a.limitedReasonRegex | quote }}}[15m])) > 0
          and on (model)
          (
            {{ $ttft }}[10m]))) > {{ $a.slo.ttftSeconds }}
            or
            {{ $itl }}[10m]))) > {{ $a.slo.itlSeconds }}
          )
        for: 10m
        labels:
          severity: warning
        annotations:
          summary: {{ printf "The %s pool of %s is held at its limit while its SLO is violated" `{{ $labels.role }}` `{{ $labels.model }}` | quote }}
          description: "The autoscaler keeps deciding with a limiting reason (maxReplicas, ratio bounds or GPU budget) while TTFT or ITL is over the SLO. Raise the bound or the GPU budget; see the Autoscaler dashboard."
          {{- with $runbook }}
          runbook_url: {{ printf "%s#kvrelaypoolatmaxwhilesloviolated" . | quote }}
          {{- end }}
  - name: kvrelay-kv-relay
    rules:
      # Share of transfers that failed. A model whose transfers all fail may never have counted a
      # completed one, so a missing completed-series counts as zero.
      - alert: KvrelayKVTransferFailures
        expr: |-
          sum by (model) (rate(kvrelay_kv_transfer_failures_total[10m]))
          /
          (
            sum by (model) (rate(kvrelay_kv_transfer_failures_total[10m]))
            + (
              sum by (model) (rate(kvrelay_kv_transfer_seconds_count[10m]))
              or 0 * sum by (model) (rate(kvrelay_kv_transfer_failures_total[10m]))
            )
          )
          > {{ $a.kvTransferFailureRatio }}
        for: 10m
        labels:
          severity: warning
        annotations:
          summary: {{ printf "KV transfers of %s are failing" `{{ $labels.model }}` | quote }}
          description: {{ printf "%s of KV transfers failed over 10m (threshold %v%%). Requests fall back to recompute or fail, depending on kvTransfer.failurePolicy. See the KV relay dashboard for reasons." `{{ $value | humanizePercentage }}` (mulf $a.kvTransferFailureRatio 100) | quote }}
          {{- with $runbook }}
          runbook_url: {{ printf "%s#kvrelaykvtransferfailures" . | quote }}
          {{- end }}
  - name: kvrelay-operator
    rules:
      - alert: KvrelayOperatorDown
        expr: absent(up{job={{ .Values.monitoring.operatorJob | quote }}} == 1)
        for: {{ $a.operatorDownFor }}
        labels:
          severity: critical
        annotations:
          summary: "No kvrelay operator replica is up"
          description: {{ printf "No target of job %s has been up for %s: DisaggregatedModels are not reconciled and autoscaling has stopped." .Values.monitoring.operatorJob $a.operatorDownFor | quote }}
          {{- with $runbook }}
          runbook_url: {{ printf "%s#kvrelayoperatordown" . | quote }}
          {{- end }}
{{- end }}
