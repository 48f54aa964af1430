# results.jsonl (one JSON line per measurement, written by run.sh) -> the Markdown table of
# medians, spreads and ratios. Plain POSIX awk (mawk is enough), so that it runs anywhere:
#
#   awk -f benches/compare/report.awk benches/compare/out/<stamp>/results.jsonl

function str(key,   m) {
    if (!match($0, "\"" key "\":\"[^\"]*\"")) return ""
    m = substr($0, RSTART, RLENGTH)
    sub(/^"[^"]*":"/, "", m)
    sub(/"$/, "", m)
    return m
}

function num(key,   m) {
    if (!match($0, "\"" key "\":-?[0-9][0-9.eE+-]*")) return ""
    m = substr($0, RSTART, RLENGTH)
    sub(/^"[^"]*":/, "", m)
    return m + 0
}

# median of arr[s, t, 1..n]; sets SPREAD to (max - min) / median in percent ("" for n < 2).
function median(arr, s, t, n,   a, i, j, x, m) {
    for (i = 1; i <= n; i++) a[i] = arr[s, t, i]
    for (i = 2; i <= n; i++) {
        x = a[i]
        for (j = i - 1; j >= 1 && a[j] > x; j--) a[j + 1] = a[j]
        a[j + 1] = x
    }
    m = (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    SPREAD = (n > 1 && m != 0) ? sprintf("%.0f%%", (a[n] - a[1]) / m * 100) : "–"
    return m
}

function fmt(v) {
    if (v == "") return "–"
    if (v >= 100 || v <= -100) return sprintf("%.0f", v)
    if (v >= 10 || v <= -10) return sprintf("%.1f", v)
    return sprintf("%.2f", v)
}

function ratio(a, b) { return (a == "" || b == "" || b == 0) ? "–" : sprintf("%.2f×", a / b) }

BEGIN {
    nt = split("direct wsgate wsgate_base nginx haproxy", fixed, " ")
    for (i = 1; i <= nt; i++) { torder[i] = fixed[i]; tknown[fixed[i]] = 1 }
    rival["nginx"] = 1
    rival["haproxy"] = 1
}

/^\{/ {
    s = str("scenario"); t = str("target")
    if (s == "" || t == "") next
    if (!(s in sknown)) { sknown[s] = 1; sorder[++ns] = s }
    if (!(t in tknown)) { tknown[t] = 1; torder[++nt] = t }
    present[s, t] = 1
    figure[s] = str("figure"); better[s] = str("better"); unit[s] = str("unit")
    if (run == "") run = str("run")
    if ($0 ~ /"unsupported":true/) { na[s, t] = 1; next }
    if ($0 ~ /"proxy_survived":false/) died[s, t]++
    if ($0 ~ /"failed":true/) { failed[s, t]++; next }
    if ((e = num("errors")) != "") errors[s, t] += e
    if ((v = num(figure[s])) != "") val[s, t, ++nv[s, t]] = v
    if ((v = num("cpu_us_per_op")) != "") cpu[s, t, ++nc[s, t]] = v
    if ((v = num("p99_us")) != "") p99[s, t, ++np[s, t]] = v
    if ((v = num("conns_open")) != "" && (!((s, t) in conns) || v < conns[s, t])) conns[s, t] = v
    if ((v = num("open_concurrency")) != "") burst[s, t] = v
    if ((v = num("late_sends")) != "") late[s, t] += v
    if ((v = num("closed_while_held")) != "") closed[s, t] += v
    if ((v = num("tls_eof_without_close_notify")) != "") noclose[s, t] += v
    if (str("transport") == "tls") tls[s] = 1
    if (str("mode") == "echo_seq") seq[s] = 1
    if (str("mode") == "long_poll") poll[s] = 1
    if (t == "wsgate_base") has_base = 1
    runs[s, t]++
}

END {
    for (si = 1; si <= ns; si++) {
        s = sorder[si]
        best[s] = ""; bestc[s] = ""
        for (ti = 1; ti <= nt; ti++) {
            t = torder[ti]
            if (nv[s, t]) { med[s, t] = median(val, s, t, nv[s, t]); spread[s, t] = SPREAD }
            if (nc[s, t]) { medc[s, t] = median(cpu, s, t, nc[s, t]); spreadc[s, t] = SPREAD }
            if (np[s, t]) medp[s, t] = median(p99, s, t, np[s, t])
            if (!(t in rival)) continue
            if (nv[s, t] && (best[s] == "" || (better[s] == "hi" ? med[s, t] > best[s] : med[s, t] < best[s])))
                best[s] = med[s, t]
            if (nc[s, t] && (bestc[s] == "" || medc[s, t] < bestc[s])) bestc[s] = medc[s, t]
        }
    }

    # With a wsgate_base target, two more columns: wsgate's median and CPU over the base's.
    printf "| scenario | target | result | unit | spread | p99 µs | proxy CPU µs/op | CPU spread | vs direct | ÷ best rival | CPU ÷ best rival |"
    print has_base ? " ÷ base | CPU ÷ base | notes |" : " notes |"
    print "|---|---|--:|---|--:|--:|--:|--:|--:|--:|--:|" (has_base ? "--:|--:|" : "") "---|"
    for (si = 1; si <= ns; si++) {
        s = sorder[si]
        for (ti = 1; ti <= nt; ti++) {
            t = torder[ti]
            if (!((s, t) in present)) continue
            if ((s, t) in na && !runs[s, t]) {
                printf "| %s | %s | n/a | %s | – | – | – | – | – | – | – |%s this target cannot do it |\n", s, t, unit[s], \
                    has_base ? " – | – |" : ""
                continue
            }
            m = nv[s, t] ? med[s, t] : ""
            d = nv[s, "direct"] ? med[s, "direct"] : ""
            if (m == "" || d == "" || t == "direct") vs = "–"
            else if (better[s] == "hi") vs = sprintf("%.0f%%", m / d * 100)
            else vs = sprintf("%+.0f %s", m - d, unit[s] ~ /^µs/ ? "µs" : unit[s])
            notes = ""
            if (failed[s, t]) notes = notes sprintf("%d of %d runs failed; ", failed[s, t], failed[s, t] + runs[s, t])
            if (died[s, t]) notes = notes sprintf("proxy exited in %d run(s); ", died[s, t])
            if (errors[s, t]) notes = notes sprintf("%d errors; ", errors[s, t])
            if (s in seq) notes = notes "1 WebSocket, 1 message in flight; "
            # A row whose figure is another latency still says what the proxy adds at p99.
            if (t != "direct" && figure[s] != "p99_us" && unit[s] ~ /^µs/ && np[s, t] && np[s, "direct"])
                notes = notes sprintf("p99 %+.0f µs vs direct; ", medp[s, t] - medp[s, "direct"])
            if ((s, t) in conns) notes = notes sprintf("%d %s", conns[s, t], (s in poll) ? "pending requests" : "conns") \
                (((s, t) in burst) ? sprintf(", %d at a time; ", burst[s, t]) : "; ")
            # long_poll: an answer before the release means the hold ended before the RSS read.
            if (closed[s, t]) notes = notes sprintf("%d %s while held; ", closed[s, t], (s in poll) ? "answered or closed" : "closed")
            if (late[s, t]) notes = notes sprintf("%d late sends; ", late[s, t])
            if (noclose[s, t]) notes = notes sprintf("%d TLS closes without close_notify; ", noclose[s, t])
            sub(/; $/, "", notes)
            printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |", s, t, fmt(m), unit[s], \
                nv[s, t] ? spread[s, t] : "–", np[s, t] ? fmt(medp[s, t]) : "–", \
                nc[s, t] ? fmt(medc[s, t]) : "–", nc[s, t] ? spreadc[s, t] : "–", vs, \
                (t in rival || t ~ /^wsgate/) ? ratio(m, best[s]) : "–", \
                (t in rival || t ~ /^wsgate/) && nc[s, t] ? ratio(medc[s, t], bestc[s]) : "–"
            if (has_base) {
                b = t == "wsgate" && nv[s, "wsgate_base"] ? med[s, "wsgate_base"] : ""
                bc = t == "wsgate" && nc[s, "wsgate_base"] ? medc[s, "wsgate_base"] : ""
                printf " %s | %s |", t == "wsgate" ? ratio(m, b) : "–", t == "wsgate" && nc[s, t] ? ratio(medc[s, t], bc) : "–"
            }
            printf " %s |\n", notes
        }
    }
    print ""
    print "Medians over the repeats of run " run "; spread = (max − min) / median. vs direct: % of the direct"
    print "result (higher is better), or the latency added for µs rows. ÷ best rival: this median over the"
    print "better of nginx and HAProxy for that row (result: the one with the better result; CPU: the lower"
    print "CPU per operation); above 1 is better for req/s, msg/s, MB/s and hs/s, below 1 is better for µs,"
    print "KiB/conn, KiB/req and CPU. Proxy CPU is utime + stime from /proc/PID/stat over the window, per"
    print "request, message or handshake."
    if (has_base) {
        print "÷ base, CPU ÷ base: wsgate's median result and CPU per operation over wsgate_base's, the"
        print "wsgate binary of another commit run with the same config and placement (machine.txt says"
        print "which); below 1 is better for CPU, µs and KiB/conn, above 1 for throughput."
    }
    for (si = 1; si <= ns; si++) if (sorder[si] in tls) has_tls = 1
    if (has_tls) {
        print "TLS rows (https, wss_*, h2_ws_echo): the proxies terminate TLS and talk plain HTTP/1.1 to the"
        print "backend; direct is the backend terminating TLS itself, so the client's work is the same in"
        print "both and a proxy can pass 100% of direct by taking the backend's TLS work off CPU 0."
    }
}
