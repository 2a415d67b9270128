-- reserve -> commit pairs for bench/http.py: a commit is sent for every reserve answered.
-- bench/load.py fills in the two amounts (the commit body's and the estimate) before wrk runs it.
local threads = {}
local next_thread = 0

function setup(thread)
  next_thread = next_thread + 1
  thread:set("thread_number", next_thread)
  table.insert(threads, thread)
end

function init(args)
  run, accounts = args[1], tonumber(args[2])
  headers = {["Authorization"] = "Bearer " .. args[3], ["Content-Type"] = "application/json"}
  commit_body = '{"actual_cost_micro":"ACTUAL"}'
  due, head, tail, sent, reserves, commits, failures = {}, 1, 0, 0, 0, 0, 0
end

function request()
  if head <= tail then
    local id = due[head]
    due[head] = nil
    head = head + 1
    return wrk.format("POST", "/v1/reservations/" .. id .. "/commit", headers, commit_body)
  end
  sent = sent + 1
  local body = string.format('{"account_id":"acct-%06d","request_id":"%s-%d-%d","estimated_cost_micro":"ESTIMATE"}',
    (thread_number * 7919 + sent) % accounts, run, thread_number, sent)
  return wrk.format("POST", "/v1/reservations", headers, body)
end

function response(status, response_headers, body)
  local id = status == 201 and string.match(body, '"billing_entry_id":"(%w+)"')
  if id then
    tail = tail + 1
    due[tail] = id
    reserves = reserves + 1
  elseif status == 200 then
    commits = commits + 1
  else
    failures = failures + 1
    if failures <= 3 then io.stderr:write("bench: answered " .. status .. ": " .. body .. "\n") end
  end
end

function done(summary, latency, requests)
  local r, c, f = 0, 0, 0
  for _, thread in ipairs(threads) do
    r, c, f = r + thread:get("reserves"), c + thread:get("commits"), f + thread:get("failures")
  end
  io.write(string.format("TOLLWAY reserves=%d commits=%d failures=%d\n", r, c, f))
end
